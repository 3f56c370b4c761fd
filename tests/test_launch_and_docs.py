"""Launch scripts (bash -n, shellcheck, --dry-run), the paper configs, the README's reference, the demo."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from mtllm_train.config import config_reference, load_config

SCRIPTS = ["launch/torchrun_single_node.sh", "launch/slurm_multinode.sbatch", "launch/deepspeed_launch.sh",
           "launch/prepare_fineweb.sh"]


# A launcher reads these from its environment; an in-process run earlier in the session may have set them.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _dry_run(script, *args, **env):
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    done = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHON": sys.executable, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("script", SCRIPTS + ["launch/_common.sh"])
def test_scripts_parse_and_are_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, "-x", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_print_usage_without_arguments(script):
    done = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Usage:" in done.stdout


@pytest.fixture
def launchable(tmp_path, train_shards):
    """Overrides under which the tiny config launches on 32 processes (the pre-flight checks them)."""
    return [f"run.dir={tmp_path}", f"data.shards={train_shards}", "distributed.backend=ddp",
            "train.global_batch_size=256"]


def test_torchrun_dry_run(launchable):
    out = _dry_run("launch/torchrun_single_node.sh", "configs/tiny.yaml", "run.name=x", *launchable, NPROC="4")
    assert out == (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 4 -m mtllm_train train "
                   f"--config configs/tiny.yaml run.name=x {' '.join(launchable)}")


def test_slurm_dry_run(launchable):
    out = _dry_run("launch/slurm_multinode.sbatch", "configs/tiny.yaml", "train.steps=5", *launchable,
                   SLURM_NNODES="4", SLURM_JOB_ID="77", GPUS_PER_NODE="8")
    assert out.startswith(f"srun --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run --nnodes 4 "
                          f"--nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint ")
    assert out.endswith(f":29500 --rdzv_id 77 -m mtllm_train train --config configs/tiny.yaml train.steps=5 "
                        f"{' '.join(launchable)}")
    header = (ROOT / "launch/slurm_multinode.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@600" in header and "#SBATCH --requeue" in header
    assert 'touch "$run_dir/STOP"' in header and 'scontrol requeue' in header


def test_deepspeed_dry_run(launchable):
    out = _dry_run("launch/deepspeed_launch.sh", "configs/tiny.yaml", *launchable[:2], "train.global_batch_size=128",
                   HOSTFILE="launch/hostfile.example", ZERO="3")
    assert out == ("deepspeed --no_local_rank --hostfile launch/hostfile.example --module mtllm_train train --config "
                   "configs/tiny.yaml distributed.backend=deepspeed distributed.zero_stage=3 "
                   f"distributed.deepspeed_config={ROOT}/configs/deepspeed/zero3.json "  # absolute: works from anywhere
                   f"{' '.join(launchable[:2])} train.global_batch_size=128")
    distributed = load_config("configs/tiny.yaml", out.split()[9:]).distributed
    assert (distributed.zero_stage, distributed.deepspeed_config) == (3, str(ROOT / "configs/deepspeed/zero3.json"))
    # The stage is ZERO's: an override would lose to the json silently.
    done = subprocess.run(["bash", "launch/deepspeed_launch.sh", "--dry-run", "configs/tiny.yaml",
                           "distributed.zero_stage=3"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "the ZeRO stage comes from ZERO=2|3 here" in done.stderr


@pytest.mark.parametrize("args, expected", [
    (["configs/nope.yaml"], ["config file 'configs/nope.yaml' does not exist"]),
    (["configs/tiny.yaml"], ["distributed.backend: 'none' cannot run on 3 processes; use ddp, fsdp or deepspeed",
                             "train.global_batch_size 16 is not a multiple of data.micro_batch_size 8 x world size 3"]),
    (["configs/tiny.yaml", "task.train=mine.jsonl", "distributed.backend=ddp", "train.global_batch_size=48"],
     ["task.train: stage 1 (mtllm train) does not read the task section"]),
])
def test_a_launch_that_would_fail_is_refused_before_anything_starts(tmp_path, train_shards, args, expected):
    """A real launch (not --dry-run): one line per problem, exit 2, no torchrun started."""
    clean = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    start = time.perf_counter()
    done = subprocess.run(["bash", "launch/torchrun_single_node.sh", *args, f"run.dir={tmp_path}",
                           f"data.shards={train_shards}"], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "PYTHON": sys.executable, "NPROC": "3"}, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == len(expected), done.stderr
    assert all(line.startswith(f"mtllm: error: {message}") for line, message in zip(lines, expected)), lines
    assert "torch.distributed.run" not in done.stdout + done.stderr and time.perf_counter() - start < 60


def test_a_config_mistake_inside_a_launch_is_said_once(tmp_path, train_shards):
    """Past the pre-flight (torchrun started directly), a mistake every rank finds alike is one line, rank 0's."""
    from helpers import finish, torchrun

    code, output = finish(torchrun("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}",
                                   f"data.shards={train_shards}", "distributed.backend=ddp", "task.train=x.jsonl"),
                          timeout=120)
    lines = [line for line in output.splitlines() if line.startswith("mtllm: error:")]
    assert code != 0 and lines == ["mtllm: error: task.train: stage 1 (mtllm train) does not read the task section; "
                                   "set task.* for task-train / task-distill (to start stage 1 from another run: "
                                   "train.init_from)"], output[-2000:]


def test_launch_scripts_run_the_stage2_commands(tmp_path):
    """Every training launcher takes the command (its pre-flight checks the stage-2 run); the default stays `train`."""
    from mtllm_train.config import dump_config

    config = "configs/tiny_sentiment.yaml"
    teacher = tmp_path / "teacher"  # a task-train run of the LLM, as task-distill's pre-flight reads it
    teacher.mkdir()
    dump_config(load_config(config, ["task.model=llm"]), teacher / "config.yaml")
    overrides = [f"run.dir={tmp_path}", "run.name=x", "distributed.backend=ddp", "train.global_batch_size=32",
                 "task.init_from=runs/mine", f"task.teacher={teacher}"]
    env = {"NPROC": "2", "SLURM_NNODES": "2", "SLURM_JOB_ID": "5", "GPUS_PER_NODE": "2", "ZERO": "2"}
    for script, command in (("launch/torchrun_single_node.sh", "task-distill"), ("launch/slurm_multinode.sbatch",
                            "task-train"), ("launch/deepspeed_launch.sh", "task-distill")):
        out = _dry_run(script, command, config, *overrides, **env)
        assert f" -m mtllm_train {command} --config {config} " in out.replace("--module", "-m"), out


def test_prepare_fineweb_dry_run(tmp_path):
    for name in ("000_00000.parquet", "001_00000.parquet"):
        (tmp_path / name).touch()
    out = _dry_run("launch/prepare_fineweb.sh", str(tmp_path), "shards/build/x", "configs/tiny/llm_tokenizer",
                   "configs/tiny/mt_tokenizer", WORKERS="16", MAX_LENGTH="256")
    assert out == (f"{sys.executable} -m mtllm_train shards build --input {tmp_path}/000_00000.parquet "
                   f"{tmp_path}/001_00000.parquet --out shards/build/x --llm-tokenizer configs/tiny/llm_tokenizer "
                   f"--mt-tokenizer configs/tiny/mt_tokenizer --mt-lang eng_Latn --max-length 256 --shard-size 10000 "
                   f"--workers 16")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_loads_and_validates(config):
    cfg = load_config(ROOT / "configs" / config)
    assert cfg.train.global_batch_size % cfg.data.micro_batch_size == 0


def test_paper_recipe_values_reach_the_trainer(tiny_cfg):
    """The paper's stage-1 recipe as the trainer builds it: LoRA (on the tiny stack, with the paper's LoRA
    settings), the optimizer and the schedule from the paper config itself."""
    import bitsandbytes as bnb

    from mtllm_train.model.stack import build_stack, trainable_parameters
    from mtllm_train.optim import build_optimizer, build_scheduler

    cfg = load_config(ROOT / "configs/stage1_nllb600m_llm2vec_llama3_8b.yaml")
    assert (cfg.model.mt_encoder, cfg.model.bidirectional, cfg.model.quantization, cfg.model.pooling) == (
        "facebook/nllb-200-distilled-600M", True, "nf4", "mean")
    assert (cfg.train.steps, cfg.train.global_batch_size, cfg.data.max_length) == (10000, 256, 512)
    tiny_cfg.model.lora = cfg.model.lora
    lora = build_stack(tiny_cfg.model).llm.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    weights = trainable_parameters(build_stack(tiny_cfg.model))
    optimizer = build_optimizer(weights, cfg.optim)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups} == {(2e-4, 0.01), (2e-4, 0.0)}
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    rates = []
    for _ in range(101):  # warmup 0.01 of 10000 steps: the peak lr at step 100
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < 1e-5 and rates[50] == pytest.approx(1e-4, rel=0.05) and rates[100] == pytest.approx(2e-4)


def test_readme_configuration_reference_matches_the_dataclasses():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == config_reference()
    assert "make demo" in readme and "make test" in readme


def test_demo_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mtllm_train", "demo", "--workdir", str(tmp_path), "--steps", "40"],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "preempted: saved step" in done.stderr + done.stdout
    assert "resumed from" in done.stderr + done.stdout
    assert re.search(r"set-up took [\d.]+ s \(stack built on cpu in [\d.]+ s\)", done.stderr + done.stdout)
    assert "steps            0 -> 40 (resumed once)" in done.stdout
    assert (tmp_path / "tiny" / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "tiny" / "export" / "adapter" / "adapter_model.safetensors").is_file()
    for route in ("AutoModel", "SentenceTransformer"):  # the export loads three ways, to the same vectors
        difference = float(re.search(rf"loaded by {route} +max \|difference\| to load_mtllm (\S+)", done.stdout).group(1))
        assert difference < 1e-5, done.stdout[-2000:]


def test_readme_your_own_run_commands_work_as_written(tmp_path):
    """The README's "Your own run" block, line by line, in a fresh folder that holds the checkout's configs."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Your own run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [command.split()[1] for command in commands] == ["shards", "shards", "config", "train", "export", "predict"]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "shards").mkdir()  # the block builds into shards/build/mine here, not in the checkout
    (tmp_path / "shards/sample").symlink_to(ROOT / "shards/sample")
    with open(ROOT / "shards/sample/enwiki_sample.jsonl", encoding="utf-8") as sample:  # the block's step 0
        (tmp_path / "my_docs.jsonl").write_text("".join(line for _, line in zip(range(300), sample)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {key: value for key, value in env.items() if key not in LAUNCH_VARIABLES}
    outputs = []
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout)
    assert "name: mine" in outputs[2] and "\ntask:" not in outputs[2]
    assert "steps 0 -> 60" in outputs[3] and (tmp_path / "runs" / "mine" / "loss_curve.png").is_file()
    assert len(json.loads(outputs[5])["vector"]) == 64
    # Then the stage-2 example on a benchmark of one's own, from that run.
    block = readme.split("### Stage 2 on your own benchmark", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [command.split()[1] for command in commands] == ["preflight", "task-train", "evaluate", "export", "predict"]
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout + done.stderr)
    assert "preflight: task-train on 1 process(es)" in outputs[6] and " dev: English " in outputs[7]
    assert "my_sentiment:deu_Latn" in outputs[7] and "| my_sentiment:fra_Latn |" in outputs[8]
    assert json.loads(outputs[10].splitlines()[0])["prediction"] in ("negative", "positive")
    # And the token task from the same run: a tag per word of the text.
    block = readme.split("A token task the same way", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert [command.split()[1] for command in commands] == ["task-train", "export", "predict"]
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout + done.stderr)
    assert "my_entities:deu_Latn" in outputs[11]
    tags = json.loads(outputs[13].splitlines()[0])["prediction"]
    assert len(tags) == len(commands[2].split('"')[1].split()) and set(tags) <= {"O", "B-PER", "I-PER", "B-ORG",
                                                                                   "I-ORG", "B-LOC", "I-LOC"}


def test_preflight_names_a_trainer_holding_the_run_folder(tmp_path, train_shards):
    import torch

    from mtllm_train.distributed import Dist
    from mtllm_train.run_folder import RunFolder, _held_locks, lock_run_folder

    run = RunFolder(tmp_path / "held")
    lock_run_folder(run, Dist(0, 1, 0, torch.device("cpu")))  # this process: the trainer
    try:
        done = subprocess.run([sys.executable, "-m", "mtllm_train", "preflight", "--world-size", "1", "--config",
                               "configs/tiny.yaml", "train", f"run.dir={tmp_path}", "run.name=held",
                               f"data.shards={train_shards}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.close(_held_locks.pop(run.path.resolve()))
    assert done.returncode == 2 and done.stderr.startswith(f"mtllm: error: run folder {run.path} is in use by another "
                                                           f"trainer (host "), done.stderr
    assert f"pid {os.getpid()}" in done.stderr and "; running)" in done.stderr

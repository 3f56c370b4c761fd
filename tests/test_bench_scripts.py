"""The bench scripts run (shape and argument checks on CPU); their numbers live in bench/RESULTS.md."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_throughput_script_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--tiny", "--steps", "1", "--max-batch", "2",
                           "--seq", "16", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["micro_batch"] == 2 and result["seq"] == 16 and result["tokens_per_s"] > 0
    assert result["llm_params"] > result["encoder_params"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full shapes would run")
def test_gpu_throughput_script_refuses_full_shapes_without_a_gpu():
    done = subprocess.run([sys.executable, "bench/gpu_throughput.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "no GPU here" in done.stderr


def test_step_flops_formula():
    from mtllm_train.metrics import step_flops

    # 2 N_llm T_llm + 2 N_enc T_mt + 4 N_llm T_mt
    assert step_flops(llm_params=10, encoder_params=3, computed_llm_tokens=7, computed_mt_tokens=5) == \
        2 * 10 * 7 + 2 * 3 * 5 + 4 * 10 * 5

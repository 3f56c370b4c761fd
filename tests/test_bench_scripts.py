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
                           "--seq", "16", "--checkpointing", "every_2", "--loop-steps", "2", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["micro_batch"] for row in result["rows"]] == [1, 2] and result["seq"] == 16
    assert result["checkpointing"] == "every_2" and all(row["tokens_per_s"] > 0 for row in result["rows"])
    assert result["llm_params"] > result["encoder_params"] > 0
    assert "| micro batch | step s |" in done.stdout
    # The real trainer at the best micro batch, over shards whose texts fill both views.
    loop = result["loop"]
    assert loop["micro_batch"] in (1, 2) and loop["tokens_per_s"] > 0 and loop["padding_efficiency"] > 0.95
    assert loop["of_bare"] == pytest.approx(loop["tokens_per_s"] / max(r["tokens_per_s"] for r in result["rows"]
                                                                     if r["micro_batch"] == loop["micro_batch"]))
    assert "The real train.py loop at micro batch" in done.stdout


def test_step_profile_runs_tiny_and_orders_the_variants(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, "bench/step_profile.py", "--tiny", "--batch", "3", "--seq", "24",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows.keys() == {"none", "full", "every_2", "selective", "none_dropout0"}
    none, full, every_2, selective = rows["none"], rows["full"], rows["every_2"], rows["selective"]
    assert 0 < full["saved_bytes_per_token"] < every_2["saved_bytes_per_token"] < none["saved_bytes_per_token"]
    # Selective keeps the frozen matmuls' outputs (counted from its policy) and recomputes only cheap work.
    assert full["saved_bytes_per_token"] < selective["saved_bytes_per_token"] < none["saved_bytes_per_token"]
    assert none["tflop"] < selective["tflop"] < every_2["tflop"]
    # Recompute: more backward ops and FLOPs, the same forward.
    assert none["ops_forward"] == full["ops_forward"] and none["ops_backward"] < every_2["ops_backward"] \
        < full["ops_backward"]
    assert none["tflop"] < every_2["tflop"] < full["tflop"]
    assert rows["none_dropout0"]["ops"] < none["ops"]
    assert "| checkpointing full |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full shapes would run")
def test_gpu_throughput_script_refuses_full_shapes_without_a_gpu():
    done = subprocess.run([sys.executable, "bench/gpu_throughput.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "no GPU here" in done.stderr


def test_the_step_flop_formula_counts_what_the_step_computes(tiny_cfg):
    """The formula behind the logged MFU against torch's FLOP counter on a real step (eager attention, whose
    matmuls the counter sees; U, which the formula leaves out, is the 64 x 64 difference)."""
    from torch.utils.flop_counter import FlopCounterMode

    from conftest import tokenize_views
    from mtllm_train.metrics import flop_shape, step_flops
    from mtllm_train.model.loss import squared_error
    from mtllm_train.model.stack import build_stack

    tiny_cfg.model.lora.dropout = 0.0
    stack = build_stack(tiny_cfg.model)
    for model in (stack.llm, stack.mt_encoder):
        model.config._attn_implementation = "eager"
    batch = tokenize_views(tiny_cfg)
    with FlopCounterMode(display=False) as counter:
        student_pooled, teacher_pooled = stack(**batch)[:2]
        squared_error(student_pooled, teacher_pooled).sum().backward()
    counts = {view: (batch[f"{view}_input_ids"].numel(), batch[f"{view}_input_ids"].numel()
                     * batch[f"{view}_input_ids"].shape[1]) for view in ("llm", "mt")}
    formula = step_flops(flop_shape(stack.llm), flop_shape(stack.mt_encoder), *counts["llm"], *counts["mt"])
    projection = 2 * 2 * stack.projection.weight.numel() * counts["mt"][0]  # forward and weight gradient
    assert formula + projection == pytest.approx(counter.get_total_flops(), rel=0.01)



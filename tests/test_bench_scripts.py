"""The bench scripts run (shape and argument checks on CPU); their numbers live in bench/RESULTS.md."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_check_runs_tiny_on_cpu_one_result_line_per_variant(tmp_path):
    out = tmp_path / "gpu.jsonl"
    only = "bare_bf16_compile,loop_bf16_compile,bare_fp8_rowwise_compile,bare_bf16_eager"
    done = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--tiny", "--steps", "1", "--loop-steps", "5",
                           "--seq", "128", "--only", only, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == only.split(",")
    bare, loop, eager = rows["bare_bf16_compile"], rows["loop_bf16_compile"], rows["bare_bf16_eager"]
    assert bare["graph_breaks"] == 0 and bare["graphs"] == 2 and bare["step_s"] > 0 and bare["step_tflop"] > 0
    assert eager["graphs"] == 0 and eager["compile"] is False
    # The real trainer over varied lengths on a grid of 64: graphs made in step 1 only, over 5 steps.
    assert loop["steps"] == 5 and loop["compiled_in_steps"] == [1, 1, 1] and loop["graph_breaks"] == 0
    assert 0.5 < loop["padding_efficiency"] < 1
    # FP8 is refused on the CPU with the trainer's own line, and the check goes on.
    assert "fp8 needs a GPU with FP8 matmuls" in rows["bare_fp8_rowwise_compile"]["error"]
    assert "| loop_bf16_compile | 16 |" in done.stdout and "graphs compiled in steps [1, 1, 1]" in done.stdout


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
    done = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--tiny", "--only", "bare_nope"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown variant(s) ['bare_nope']" in done.stderr


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
        out = stack(**batch)
        student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
        squared_error(student_pooled, teacher_pooled).sum().backward()
    counts = {view: (batch[f"{view}_input_ids"].numel(), batch[f"{view}_input_ids"].numel()
                     * batch[f"{view}_input_ids"].shape[1]) for view in ("llm", "mt")}
    formula = step_flops(flop_shape(stack.llm), flop_shape(stack.mt_encoder), *counts["llm"], *counts["mt"])
    projection = 2 * 2 * stack.projection.weight.numel() * counts["mt"][0]  # forward and weight gradient
    assert formula + projection == pytest.approx(counter.get_total_flops(), rel=0.01)



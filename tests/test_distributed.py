"""2-process runs under torchrun on gloo, for every backend: equivalence with 1 process, preemption, resume."""

import os
import signal
import time

import pytest
import torch

from conftest import read_metrics, trained_weights, train_overrides
from helpers import child_pids, finish, torchrun
import mtllm_train.model.fp8 as fp8
from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import load_config
from mtllm_train.train import train

STEPS = 24
# No LoRA dropout: 1 process and 2 ranks then compute the same function (dropout streams are per rank). Every
# loss term (sequence, word-span, in-batch contrastive), a held-out evaluation and the multilingual probe, so
# each is tested across ranks.
COMMON = {"train.steps": STEPS, "checkpoint.every": 6, "model.lora.dropout": 0.0, "loss.span_weight": 0.5,
          "loss.contrastive_weight": 0.1, "data.eval_every": 12, "probe.every": 12,
          "probe.sets": "[shards/sample/bitext_probe.jsonl]"}


def _torchrun(run_dir, shards, name, backend, entry=("-m", "mtllm_train"), **overrides):
    """Start `mtllm train` on 2 ranks; COMMON settings unless `overrides` says otherwise."""
    settings = {**COMMON, "run.name": name, "distributed.backend": backend, "data.num_workers": 1,
                "data.eval_shards": str(shards), **overrides}
    return torchrun("train", "--config", "configs/tiny.yaml", *train_overrides(run_dir, shards, **settings),
                    entry=entry)


def _run_preempted(run_dir, shards, name, backend):
    """Start a 2-rank run, SIGTERM one worker after a few steps; return the step it stopped at."""
    process = _torchrun(run_dir, shards, name, backend)
    metrics = run_dir / name / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            os.kill(max(child_pids(process.pid)), signal.SIGTERM)  # one rank only: the ranks must agree
            break
        time.sleep(0.02)
    code, output = finish(process)
    assert code == 0, output[-3000:]
    assert "preempted: saved step" in output, output[-3000:]
    return Checkpoints(run_dir / name).steps()[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_shards):
    """1 process, 2 reader workers, 2 micro-batches a step: the same global batches as 2 ranks x 1 worker."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(load_config("configs/tiny.yaml", train_overrides(run_dir, train_shards, **{
        **COMMON, "run.name": "one", "data.num_workers": 2, "data.eval_shards": str(train_shards)})))
    return read_metrics(run_dir / "one")


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_two_ranks_train_match_one_process_and_resume(tmp_path, train_shards, reference, backend):
    code, output = finish(_torchrun(tmp_path, train_shards, "straight", backend))
    assert code == 0, output[-3000:]
    records = read_metrics(tmp_path / "straight")
    losses = [m["loss"] for m in records]
    mse = [m["mse"] for m in records]
    assert len(losses) == STEPS and sum(mse[-5:]) < 0.5 * sum(mse[:5]) and losses[-1] < losses[0]
    assert {"span_mse", "contrastive"} <= records[0].keys()
    assert [m["step"] for m in records if "eval_mse" in m] == [12, 24] and records[23]["eval_mse"] < records[11]["eval_mse"]
    assert output.count(f"steps 0 -> {STEPS}") == 1, "only rank 0 reports"
    # Same samples in every global batch; only the order of float sums differs (ddp measured exact, fsdp and
    # deepspeed within 1e-7 relative on this machine).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([m["loss"] for m in reference]), rtol=1e-5, atol=1e-7)
    # The probe: each rank encodes its share; the gathered vectors give the one-process numbers. Under ddp the
    # weights are the one process's bit for bit, so the R@1 values are equal; fsdp and deepspeed sum in another
    # order (weights within 1e-7), which may flip a near tie of the tiny untrained model: one of 16 sentences.
    probed = [{k: v for k, v in m.items() if k.startswith("probe_")} for m in records if "probe_stack_mean" in m]
    expected = [{k: v for k, v in m.items() if k.startswith("probe_")} for m in reference if "probe_stack_mean" in m]
    assert len(probed) == len(expected) == 2 and len(probed[0]) == 2 * 2 * 5 + 2  # spaces x directions x languages
    tolerance = 1e-6 if backend == "ddp" else 1 / 16 + 1e-6
    assert all(ours == pytest.approx(theirs, abs=tolerance) for ours, theirs in zip(probed, expected)), [
        (k, a[k], b[k]) for a, b in zip(probed, expected) for k in a if abs(a[k] - b[k]) > tolerance]

    stopped = _run_preempted(tmp_path, train_shards, "preempted", backend)
    assert 1 <= stopped < STEPS
    assert len(read_metrics(tmp_path / "preempted")) == stopped
    code, output = finish(_torchrun(tmp_path, train_shards, "preempted", backend))
    assert code == 0 and "resumed from" in output and f"steps {stopped} -> {STEPS}" in output, output[-3000:]
    straight, resumed = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "preempted")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight), "resume must be bit-identical"


@pytest.mark.parametrize("backend, optimizer", [("ddp", "adamw8bit"), ("fsdp", "adamw")])
def test_two_ranks_train_a_4bit_base(tmp_path, train_shards, backend, optimizer):
    code, output = finish(_torchrun(tmp_path, train_shards, "qlora", backend, **{
        "optim.name": optimizer, "train.steps": 12, "model.quantization": "nf4", "model.quant_compute_dtype": "float32",
        "model.quant_storage_dtype": "bfloat16", "model.lora.dropout": 0.05}))
    assert code == 0, output[-3000:]
    losses = [m["mse"] for m in read_metrics(tmp_path / "qlora")]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


FP8 = {"train.steps": 12, "model.quantization": "fp8", "data.eval_every": 0}


@pytest.fixture(scope="module")
def fp8_reference(tmp_path_factory, train_shards):
    """The FP8 base in 1 process (the CPU standing in for an H100), as `reference` otherwise."""
    run_dir = tmp_path_factory.mktemp("fp8_reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fp8, "check_fp8_support", lambda device: None)
        patch.setattr("mtllm_train.train.check_fp8_support", lambda device: None)
        train(load_config("configs/tiny.yaml", train_overrides(run_dir, train_shards, **{
            **COMMON, **FP8, "run.name": "one", "data.num_workers": 2})))
    return [m["loss"] for m in read_metrics(run_dir / "one")]


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_two_ranks_with_an_fp8_base_match_one_process(tmp_path, train_shards, fp8_reference, backend):
    # Every backend leaves the float8 weights (buffers) whole and as they are: DDP does not broadcast them, FSDP
    # and DeepSpeed shard parameters only. (DeepSpeed's bf16 cast, GPU only, also casts parameters only: its
    # engine's _cast_module_mixed_precision keeps buffers unless a buffer dtype is set.)
    code, output = finish(_torchrun(tmp_path, train_shards, "fp8", backend, entry=("tests/fp8_on_cpu.py",), **FP8))
    assert code == 0, output[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "fp8")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fp8_reference), rtol=1e-5, atol=1e-7)


def test_deepspeed_zero3_trains_and_exports(tmp_path, train_shards):
    from mtllm_train.export import export_run, load_mtllm

    code, output = finish(_torchrun(tmp_path, train_shards, "zero3", "deepspeed", **{
        "distributed.zero_stage": 3, "train.steps": 12, "model.lora.dropout": 0.05}))
    assert code == 0, output[-3000:]
    losses = [m["mse"] for m in read_metrics(tmp_path / "zero3")]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses
    # ZeRO-3 partitions the parameters; the checkpoint still yields the full trainable weights.
    weights = trained_weights(tmp_path / "zero3")
    assert weights["projection.weight"].shape == (64, 64)
    mtllm = load_mtllm(export_run(str(tmp_path / "zero3"), str(tmp_path / "export")))
    torch.testing.assert_close(mtllm.projection.weight, weights["projection.weight"])

"""The FP8 frozen base (model.quantization: fp8). torch._scaled_mm runs on CPU too, so the numerics and the
training path are checked here with the hardware check bypassed; the check itself is tested with the GPU's
answers stood in."""


import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import mtllm_train.distributed as distributed
import mtllm_train.model.fp8 as fp8
from conftest import read_metrics, tokenize_views, train_overrides
from helpers import ROOT
from mtllm_train.__main__ import main
from mtllm_train.config import ConfigError, load_config
from mtllm_train.export import export_run
from mtllm_train.metrics import parameter_count
from mtllm_train.model.fp8 import Float8FrozenLinear, check_fp8_support
from mtllm_train.distributed import compile_layers
from mtllm_train.model.loss import squared_error
from mtllm_train.model.stack import build_stack, trainable_parameters
from mtllm_train.train import train


def test_fp8_layer_is_close_to_bf16_saves_no_activation_and_computes_only_the_input_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(256, 512, bias=True).requires_grad_(False)
    fp8_layer = Float8FrozenLinear(layer)
    assert {buffer.qdata.dtype for buffer in (fp8_layer.weight_fp8, fp8_layer.weight_t_fp8)} == {torch.float8_e4m3fn}
    assert list(fp8_layer.parameters()) == [] and list(fp8_layer.state_dict()) == []  # nothing in checkpoints
    x = torch.randn(4, 32, 256, requires_grad=True)
    grad_out = torch.randn(4, 32, 512)
    results = {}
    for name, module in (("bf16", layer), ("fp8", fp8_layer)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
        grad_x, = torch.autograd.grad(out.float(), x, grad_out)
        results[name] = (out.float(), grad_x, [t for t in saved if t.numel() >= x.numel() // 2])
    (out, grad_x, _), (out8, grad_x8, saved8) = results["bf16"], results["fp8"]
    # e4m3 keeps 3 mantissa bits: a few percent of relative error, the same direction.
    assert (out8 - out).norm() / out.norm() < 0.06
    assert (grad_x8 - grad_x).norm() / grad_x.norm() < 0.06
    assert torch.nn.functional.cosine_similarity(grad_x8.flatten(), grad_x.flatten(), dim=0) > 0.99
    assert saved8 == []  # the frozen weight's gradient is never needed: no activation kept for backward
    # Padding: all-zero rows of activations and gradients stay zero (a per-row scale of 0 would make them NaN).
    x_padded, grad_padded = x.detach().clone().requires_grad_(), grad_out.clone()
    with torch.no_grad():
        x_padded[0, 5:] = 0
    grad_padded[0, 5:] = 0
    out_padded = fp8_layer(x_padded)
    grad_x_padded, = torch.autograd.grad(out_padded.float(), x_padded, grad_padded)
    assert torch.isfinite(out_padded).all() and torch.isfinite(grad_x_padded).all()
    assert grad_x_padded[0, 5:].abs().max() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the command-line part expects a CPU-only machine")
def test_fp8_is_refused_with_one_line_where_the_gpu_or_torchao_cannot_run_it(monkeypatch, tmp_path, capsys,
                                                                             train_shards):
    with pytest.raises(ConfigError, match=r"fp8 needs a GPU with FP8 matmuls .*this rank runs on cpu"):
        check_fp8_support(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"compute capability 8.9\+.*NVIDIA A100-SXM4-80GB has 8.0"):
        check_fp8_support(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_support(torch.device("cuda", 0))  # an H100
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"fp8 needs torchao: pip install -e '.\[fp8\]' \(torchao==0.18.0\)"):
        check_fp8_support(torch.device("cuda", 0))
    monkeypatch.undo()
    # From the command line: exit 2, one line.
    argv = ["train", "--config", str(ROOT / "configs/tiny.yaml"), f"run.dir={tmp_path}", f"data.shards={train_shards}",
            "model.quantization=fp8"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["mtllm: error: model.quantization: fp8 needs a GPU with FP8 matmuls (compute capability "
                     "8.9+: H100, H200, L40S); this rank runs on cpu. Use none, nf4 or fp4 here"], lines


def test_a_run_with_an_fp8_base_trains_its_adapters_and_exports_a_bf16_base(tmp_path, train_shards, monkeypatch):
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)  # CPU stands in for an H100
    monkeypatch.setattr("mtllm_train.train.check_fp8_support", lambda device: None)
    converted = []
    real_fp8_base = fp8.fp8_base

    def counting_fp8_base(model, device, scaling):
        converted.append(real_fp8_base(model, device, scaling))
        converted.append(sum(isinstance(m, Float8FrozenLinear) for m in model.modules()))
        return converted[0]

    monkeypatch.setattr("mtllm_train.train.fp8_base", counting_fp8_base)
    common = {"train.steps": 8, "checkpoint.every": 8, "model.lora.dropout": 0.0, "run.name": "bf16"}
    train(load_config(ROOT / "configs/tiny.yaml", train_overrides(tmp_path, train_shards, **common)))
    cfg = load_config(ROOT / "configs/tiny.yaml", train_overrides(tmp_path, train_shards, **{
        **common, "run.name": "fp8", "model.quantization": "fp8"}))
    summary = train(cfg)
    layers = cfg.model.llm["num_hidden_layers"]
    assert converted == [7 * layers, 7 * layers]  # q, k, v, o, gate, up, down of every layer
    bf16, fp8_run = read_metrics(tmp_path / "bf16"), read_metrics(tmp_path / "fp8")
    assert fp8_run[0]["mse"] == pytest.approx(bf16[0]["mse"], rel=0.05)  # same start, float8 matmuls
    assert fp8_run[-1]["mse"] < 0.7 * fp8_run[0]["mse"] and summary["end_step"] == 8
    # The export loads anywhere: the adapters and U on a base in model.dtype.
    folder = tmp_path / "export"
    export_run(str(tmp_path / "fp8"), str(folder))
    assert '"quantization": "none"' in (folder / "config.json").read_text()


def test_an_fp8_llm_counts_the_same_parameters_for_mfu(tiny_cfg, monkeypatch):
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)
    stack = build_stack(tiny_cfg.model)
    before = parameter_count(stack.llm)
    fp8.fp8_base(stack.llm, torch.device("cpu"))
    assert parameter_count(stack.llm) == before  # the float8 weights are buffers, still counted


def test_compiled_fp8_layers_with_selective_checkpointing_equal_the_eager_ones(tiny_cfg, monkeypatch):
    """aot_eager: AOTAutograd's graphs and the selective policy's recompute, as inductor uses them."""
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "aot_eager")
    tiny_cfg.model.lora.dropout, tiny_cfg.model.activation_checkpointing = 0.0, "selective"
    batch = tokenize_views(tiny_cfg)

    def losses(compiled: bool) -> list[float]:
        stack = build_stack(tiny_cfg.model)
        fp8.fp8_base(stack.llm, torch.device("cpu"))
        if compiled:
            compile_layers(stack.llm, dynamic_lengths=False)
        optimizer = torch.optim.AdamW(trainable_parameters(stack).values(), lr=3e-3)
        values = []
        for _ in range(3):
            out = stack(**batch)
            student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
            loss = squared_error(student_pooled, teacher_pooled).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            values.append(loss.item())
        return values

    eager = losses(compiled=False)
    torch._dynamo.reset()
    counters.clear()
    assert losses(compiled=True) == eager
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3  # all made in step 1


def test_fp8_layers_under_checkpointing_recompute_exactly_and_selective_keeps_their_outputs(tiny_cfg, monkeypatch):
    """Gradients bit-equal under none / full / selective. torch._scaled_mm is among the ops selective keeps (and
    torchao is told to use it): its backward runs as many float8 matmuls as none's (the input gradients), where
    full recomputes the forward's too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScaledMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._scaled_mm.default
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(fp8, "check_fp8_support", lambda device: None)
    tiny_cfg.model.lora.dropout = 0.0
    batch = tokenize_views(tiny_cfg)
    gradients, backward_matmuls = {}, {}
    for policy in ("none", "selective", "full"):
        tiny_cfg.model.activation_checkpointing = policy
        stack = build_stack(tiny_cfg.model)
        fp8.fp8_base(stack.llm, torch.device("cpu"))
        out = stack(**batch)
        student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
        with ScaledMatmuls() as counter:
            squared_error(student_pooled, teacher_pooled).mean().backward()
        backward_matmuls[policy] = counter.count
        gradients[policy] = {name: p.grad for name, p in trainable_parameters(stack).items()}
    for policy in ("full", "selective"):
        for name, grad in gradients["none"].items():
            torch.testing.assert_close(gradients[policy][name], grad, rtol=0, atol=0)
    layers = tiny_cfg.model.llm["num_hidden_layers"]
    assert backward_matmuls["selective"] == backward_matmuls["none"] > 0
    assert backward_matmuls["full"] == backward_matmuls["none"] + 7 * layers


def test_fp8_scaling_gives_one_scale_per_row_or_per_tensor_to_weights_and_inputs():
    layer = nn.Linear(32, 64)
    rowwise, tensorwise = Float8FrozenLinear(layer, "rowwise"), Float8FrozenLinear(layer, "tensorwise")
    assert rowwise.weight_fp8.scale.shape == (64, 1) and rowwise.weight_t_fp8.scale.shape == (32, 1)
    assert tensorwise.weight_fp8.scale.numel() == tensorwise.weight_t_fp8.scale.numel() == 1
    assert type(tensorwise.weight_fp8.act_quant_kwargs.granularity).__name__ == "PerTensor"
    inputs = torch.randn(3, 32)
    with torch.no_grad():  # both close to the bf16 layer, by different roundings
        reference = layer(inputs)
        for fp8_layer in (rowwise, tensorwise):
            torch.testing.assert_close(fp8_layer(inputs).float(), reference, rtol=0.15, atol=0.1)
        assert not torch.equal(rowwise(inputs), tensorwise(inputs))

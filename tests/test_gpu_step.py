"""The GPU-grade step, checked on CPU: no KV cache, activation checkpointing that recomputes what its policy
names, LoRA in the autocast dtype without activation copies, compiled layers without graph breaks or recompiles."""

from collections import Counter

import pytest
import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
import transformers
from transformers import cache_utils

import mtllm_train.distributed as distributed
from conftest import tokenize_views, train_overrides
from mtllm_train.config import ConfigError, load_config
from mtllm_train.distributed import compile_layers, repeated_layers
from mtllm_train.model.loading import build_llm, build_mt_encoder
from mtllm_train.model.loss import squared_error
from mtllm_train.model.stack import add_lora, build_stack, trainable_parameters
from mtllm_train.tasks.models import build_task_model
from mtllm_train.train import train


def _step(stack, batch, optimizer=None):
    """One training step on `batch`: (loss, gradients of the trainable parameters)."""
    out = stack(**batch)
    student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
    loss = squared_error(student_pooled, teacher_pooled).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainable_parameters(stack).items()}
    if optimizer is not None:
        optimizer.step()
    stack.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_no_training_or_evaluation_forward_builds_or_returns_a_kv_cache(tiny_cfg, monkeypatch):
    built = []
    original_init = cache_utils.Cache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.Cache, "__init__", counting_init)
    batch = tokenize_views(tiny_cfg)
    stack = build_stack(tiny_cfg.model)
    _step(stack, batch)
    states = stack.mt_states(batch["mt_input_ids"], batch["mt_attention_mask"])
    for mode in (True, False):
        stack.train(mode)
        with torch.no_grad():
            stack(**batch)
            embeds = stack.projection(states)
            assert stack.llm(inputs_embeds=embeds, attention_mask=batch["mt_attention_mask"]).past_key_values is None
    # Stage 2: the fine-tuned LLM (and task-distill's teacher) and the stack with a task head.
    for kind, view in (("llm", "llm"), ("stack", "mt")):
        model = build_task_model(tiny_cfg, kind)
        for mode in (True, False):
            model.train(mode)
            _, logits, _ = model(batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"])
            if mode:
                logits.sum().backward()
    assert built == []


def _with_four_layers(cfg, policy):
    cfg.model.llm = {**cfg.model.llm, "num_hidden_layers": 4}
    cfg.model.activation_checkpointing = policy
    return cfg


@pytest.mark.parametrize("policy, checkpointed", [("full", {0, 1, 2, 3}), ("every_2", {0, 2})])
def test_checkpointing_recomputes_the_policys_layers_and_changes_nothing_else(tiny_cfg, policy, checkpointed):
    """LoRA dropout on (0.05): the recompute must draw the forward's dropout masks again."""
    batch = tokenize_views(tiny_cfg)
    torch.manual_seed(0)
    reference_loss, reference_grads = _step(build_stack(_with_four_layers(tiny_cfg, "none").model), batch)
    stack = build_stack(_with_four_layers(tiny_cfg, policy).model)
    runs, saved_bytes, current = [0] * 4, [0] * 4, [None]
    for index, layer in enumerate(repeated_layers(stack.llm)):
        # A submodule's hook fires in the forward and in the backward's recompute (the layer's own only once).
        layer.input_layernorm.register_forward_pre_hook(
            lambda module, args, index=index: runs.__setitem__(index, runs[index] + torch.is_grad_enabled()))
        layer.register_forward_pre_hook(lambda module, args, index=index: current.__setitem__(0, index))
        layer.register_forward_hook(lambda module, args, output: current.__setitem__(0, None))
    seen = set()

    def pack(tensor):
        if current[0] is not None and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            saved_bytes[current[0]] += tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, grads = _step(stack, batch)
    assert runs == [2 if index in checkpointed else 1 for index in range(4)]
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=0, atol=0)
    # A checkpointed layer keeps only its input for the backward pass; the others keep ~30 activations of that size.
    batch_size, length = batch["mt_input_ids"].shape
    layer_input = batch_size * length * stack.llm.config.hidden_size * 4
    for index in range(4):
        if index in checkpointed:
            assert saved_bytes[index] == layer_input, saved_bytes
        else:
            assert saved_bytes[index] > 20 * layer_input, saved_bytes


class MatmulShapes(TorchDispatchMode):
    """Records the (rows, inner, columns) of every aten.mm / addmm that runs."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            first, second = args[-2], args[-1]
            self.shapes.append((first.shape[0], first.shape[1], second.shape[1]))
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_recomputes_only_the_lora_matmuls_and_changes_nothing(tiny_cfg):
    """The frozen layers' matmul outputs are kept; LoRA's rank-r matmuls (and the cheap ops) are recomputed; LoRA
    dropout on: the recompute draws the same masks. Under bf16 autocast with a bf16 base, as on a GPU (autocast
    caches its casts of the LoRA weights in the forward, not in the recompute)."""
    tiny_cfg.model.dtype = "bfloat16"
    batch = tokenize_views(tiny_cfg)
    backward_matmuls, results = {}, {}
    for policy in ("none", "selective", "full"):
        stack = build_stack(_with_four_layers(tiny_cfg, policy).model)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stack(**batch)
            student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
        with MatmulShapes() as seen:
            squared_error(student_pooled, teacher_pooled).mean().backward()
        backward_matmuls[policy] = Counter(seen.shapes)
        results[policy] = {name: p.grad for name, p in trainable_parameters(stack).items()}
    rank = tiny_cfg.model.lora.r
    recomputed = {policy: backward_matmuls[policy] - backward_matmuls["none"] for policy in ("selective", "full")}
    assert recomputed["selective"] and all(rank in (inner, columns) for _, inner, columns in recomputed["selective"])
    assert any(rank not in (inner, columns) for _, inner, columns in recomputed["full"])  # full redoes the base
    assert recomputed["selective"] == Counter({shape: count for shape, count in recomputed["full"].items()
                                               if rank in shape[1:]})
    for name, grad in results["none"].items():
        torch.testing.assert_close(results["selective"][name], grad, rtol=0, atol=0)


def test_checkpointing_keeps_the_frozen_models_dropout_off(tiny_cfg):
    tiny_cfg.model.activation_checkpointing, tiny_cfg.model.lora.dropout = "full", 0.0
    assert tiny_cfg.model.llm["attention_dropout"] > 0
    stack = build_stack(tiny_cfg.model).train()
    layers = list(repeated_layers(stack.llm))
    # transformers recomputes a layer only while its own flag is set; nothing else of the frozen LLM trains.
    training = {module for module in stack.llm.modules() if module.training}
    lora_dropouts = {module for name, module in stack.llm.named_modules() if ".lora_dropout." in name}
    assert training == set(layers) | lora_dropouts
    batch = tokenize_views(tiny_cfg)
    first = stack.student_pooled(batch["mt_input_ids"], batch["mt_attention_mask"])
    second = stack.student_pooled(batch["mt_input_ids"], batch["mt_attention_mask"])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    stack.eval()
    assert not any(module.training for module in stack.modules())


@pytest.mark.parametrize("value, policy", [(True, "full"), (False, "none"), ("every_3", "every_3"), ("none", "none")])
def test_checkpointing_policy_accepts_the_old_booleans(value, policy):
    assert load_config("configs/tiny.yaml", [f"model.activation_checkpointing={str(value).lower()}"]) \
        .model.activation_checkpointing == policy


@pytest.mark.parametrize("value", ["every_1", "every_0", "some", "selective_2"])
def test_checkpointing_policy_refuses_unknown_names(value):
    with pytest.raises(ConfigError, match=r"model\.activation_checkpointing: expected none, full, selective or "
                                          r"every_<k>"):
        load_config("configs/tiny.yaml", [f"model.activation_checkpointing={value}"])


class ActivationCopies(TorchDispatchMode):
    """Counts aten copies (`_to_copy`, `copy_`) whose result holds at least `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_) and out.numel() >= self.numel:
            self.count += 1
        return out


def _lora_forward_backward_copies(layer: nn.Module, inputs: torch.Tensor) -> int:
    with ActivationCopies(inputs.numel()) as copies:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(inputs)
        out.sum().backward()
    return copies.count


def test_lora_layer_under_autocast_makes_no_activation_sized_copy(tiny_cfg):
    tiny_cfg.model.dtype = "bfloat16"  # the frozen base in bf16, as on GPU
    llm = add_lora(build_llm(tiny_cfg.model), tiny_cfg.model)
    layer = repeated_layers(llm)[0].self_attn.q_proj
    layer.train()  # LoRA dropout on
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    nn.init.normal_(lora_b)  # nonzero, so that the LoRA path counts in the output and the gradients
    assert lora_a.dtype == lora_b.dtype == torch.float32  # fp32 master weights
    inputs = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    assert _lora_forward_backward_copies(layer, inputs) == 0
    assert lora_a.grad.dtype == lora_b.grad.dtype == torch.float32 and lora_a.grad.abs().sum() > 0
    # The same layer as peft computes it copies the input to fp32 and autocast copies it back.
    layer.__class__ = PeftLoraLinear
    assert _lora_forward_backward_copies(layer, inputs) > 0
    # Outside autocast the input is cast to the adapter's dtype, as peft does (a bf16 base with fp32 adapters runs).
    layer.eval()
    with torch.no_grad():
        expected = layer.base_layer(inputs).float() + layer.scaling["default"] * (inputs.float() @ lora_a.T @ lora_b.T)
        torch.testing.assert_close(layer(inputs).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("policy, graphs", [("none", 2), ("every_2", 4), ("selective", 3)])
def test_compiled_layers_have_no_graph_break_no_recompile_and_equal_losses(tiny_cfg, monkeypatch, policy, graphs):
    """graphs: teacher and student; under every_2 each for checkpointed and for plain layers; under selective the
    student's first layer (its input needs no gradient) apart."""
    # dynamo's eager backend (fast on CPU) replays a checkpointed dropout with other masks than the forward's
    # (aot_eager and inductor do not): no LoRA dropout here; the test below runs it with dropout.
    tiny_cfg.model.lora.dropout, tiny_cfg.model.activation_checkpointing = 0.0, policy
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "eager")
    batch = tokenize_views(tiny_cfg)

    def losses(compiled: bool) -> list[float]:
        stack = build_stack(tiny_cfg.model)
        if compiled:
            compile_layers(stack.llm, dynamic_lengths=False)
        optimizer = torch.optim.AdamW(trainable_parameters(stack).values(), lr=3e-3)
        return [_step(stack, batch, optimizer)[0].item() for _ in range(3)]

    eager = losses(compiled=False)
    torch._dynamo.reset()
    counters.clear()
    assert losses(compiled=True) == eager
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs  # all compiled in step 1, shared by every layer


def test_compiled_fsdp_step_with_checkpointing_equals_the_plain_one(tmp_path, train_shards, monkeypatch):
    """Through the trainer: compile after FSDP2 wrapped the layers, every_2 checkpointing, LoRA dropout on, and
    aot_eager (AOTAutograd's graphs and recompute, as inductor uses them, without a C++ compiler). One static
    shape (every batch padded to max_length): dynamic lengths are tests/test_static_shapes.py's subject."""
    graphs, aot_eager = [], torch._dynamo.lookup_backend("aot_eager")

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    monkeypatch.setattr(distributed, "COMPILE_BACKEND", recording_aot_eager)

    def run(name, **extra):
        cfg = load_config("configs/tiny.yaml", train_overrides(tmp_path, train_shards, **{
            "run.name": name, "train.steps": 3, "model.activation_checkpointing": "every_2", "data.pad_multiple": 48,
            **extra}))
        return train(cfg)["losses"]

    plain = run("plain")
    torch._dynamo.reset()
    counters.clear()
    compiled = run("compiled", **{"distributed.backend": "fsdp", "model.compile": True})
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-5, atol=1e-7)
    # The compiled layers really checkpoint (in the outermost class's forward, which FSDP2's subclass now is).
    checkpointing = [any(node.target is torch.ops.higher_order.tag_activation_checkpoint for node in graph.graph.nodes)
                     for graph in graphs]
    assert any(checkpointing) and not all(checkpointing), checkpointing


class HostBytes(TorchDispatchMode):
    """Adds up the bytes of every cpu tensor an aten op creates (factory functions included)."""

    def __init__(self):
        super().__init__()
        self.created = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.created += tensor.numel() * tensor.element_size()
        return out


def test_the_stack_is_built_on_its_device_and_random_frozen_weights_do_not_depend_on_it(tiny_cfg, tmp_path,
                                                                                      monkeypatch):
    # Pretrained weights load straight into the device's memory: 8 ranks of a node must not each hold a host copy
    # of the LLM first. (transformers reads each tensor of the file into `device_map`'s device.)
    llm_folder = tmp_path / "llm"
    build_llm(tiny_cfg.model).save_pretrained(llm_folder)
    tiny_cfg.model.llm, tiny_cfg.model.llm_tokenizer = str(llm_folder), "configs/tiny/llm_tokenizer"
    loads = []
    real_from_pretrained = transformers.AutoModel.from_pretrained.__func__

    def recording_from_pretrained(cls, *args, **kwargs):
        loads.append(kwargs.get("device_map"))
        return real_from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(recording_from_pretrained))
    stack = build_stack(tiny_cfg.model, "meta")
    assert loads == [{"": torch.device("meta")}]
    assert {t.device.type for t in (*stack.parameters(), *stack.buffers())} == {"meta"}
    # Random frozen weights (the inline MT encoder) are not saved with a run; export and stage 2 rebuild them, maybe
    # elsewhere: they are drawn on the host, the same numbers whatever device the run used ...
    reference = build_mt_encoder(tiny_cfg.model, "cpu").state_dict()
    with HostBytes() as on_host:
        build_mt_encoder(tiny_cfg.model, "meta")
    weight_bytes = sum(t.numel() * t.element_size() for t in reference.values())
    assert on_host.created >= weight_bytes
    # ... unless a benchmark of a large random model makes the device the default: then nothing is on the host.
    with HostBytes() as on_host, torch.device("meta"):
        encoder = build_mt_encoder(tiny_cfg.model, "meta")
    assert on_host.created < 0.01 * weight_bytes and {p.device.type for p in encoder.parameters()} == {"meta"}
    torch.testing.assert_close(build_mt_encoder(tiny_cfg.model, "cpu").state_dict(), reference, rtol=0, atol=0)

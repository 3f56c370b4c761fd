import pytest
import torch

from conftest import TINY_GPT2, tokenize_views
from mtllm_train.config import ConfigError
from mtllm_train.model.loading import build_llm
from mtllm_train.model.loss import squared_error
from mtllm_train.portable.pooling import pool
from mtllm_train.model.stack import build_stack, trainable_parameters


def _hidden(llm, input_ids, attention_mask):
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        return llm(input_ids=input_ids, **kwargs).last_hidden_state


@pytest.mark.parametrize("llm_spec", ["llama", "gpt2"])
@pytest.mark.parametrize("mask_kind", ["ones", "none"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bidirectional_attention_sees_the_future(tiny_cfg, llm_spec, mask_kind, batch):
    if llm_spec == "gpt2":
        tiny_cfg.model.llm = TINY_GPT2
    input_ids = torch.randint(5, 2000, (batch, 7))
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 2000
    mask = torch.ones_like(input_ids) if mask_kind == "ones" else None
    for bidirectional in (True, False):
        tiny_cfg.model.bidirectional = bidirectional
        llm = build_llm(tiny_cfg.model)
        first_before = _hidden(llm, input_ids, mask)[:, 0]
        first_after = _hidden(llm, changed, mask)[:, 0]
        moved = (first_before - first_after).abs().max().item()
        if bidirectional:
            assert moved > 1e-4, "bidirectional LLM: position 0 must depend on the last token"
        else:
            assert moved == 0.0, "causal LLM: position 0 must not depend on the last token"


TINY_BERT = {"model_type": "bert", "vocab_size": 2000, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}


@pytest.mark.parametrize("llm_spec, bidirectional", [("llama", True), ("llama", False), ("gpt2", True),
                                                     ("gpt2", False), ("bert", False)])
def test_the_stacks_llm_pass_masks_attention_as_the_llms_own_forward(tiny_cfg, llm_spec, bidirectional):
    """The mask the stack builds for its LLM pass (always a tensor, for compiled layers) is the one the LLM's own
    forward uses: causal, both ways (model.bidirectional), and both ways for an encoder such as BERT / MiniLM
    (which a causal mask once turned into another model: the mini reproduction's teacher)."""
    tiny_cfg.model.llm = {"llama": tiny_cfg.model.llm, "gpt2": TINY_GPT2, "bert": TINY_BERT}[llm_spec]
    tiny_cfg.model.bidirectional = bidirectional
    stack = build_stack(tiny_cfg.model).eval()
    input_ids = torch.randint(5, 2000, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    with torch.no_grad(), stack.llm.disable_adapter():
        own = stack.llm(input_ids=input_ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(stack.teacher_hidden(input_ids, mask)[mask.bool()], own[mask.bool()], rtol=0, atol=1e-6)


def test_bidirectional_padding_is_still_masked(tiny_cfg):
    llm = build_llm(tiny_cfg.model)
    input_ids = torch.randint(5, 2000, (1, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    changed_pad = input_ids.clone()
    changed_pad[0, 4:] = 7
    torch.testing.assert_close(_hidden(llm, input_ids, mask)[:, :4], _hidden(llm, changed_pad, mask)[:, :4])


def _train_steps(stack, batch, steps, lr=3e-3):
    optimizer = torch.optim.AdamW(trainable_parameters(stack).values(), lr=lr)
    losses = []
    for _ in range(steps):
        out = stack(**batch)
        student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
        loss = squared_error(student_pooled, teacher_pooled).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_teacher_pass_equals_plain_llm_before_and_after_training(tiny_cfg):
    batch = tokenize_views(tiny_cfg)
    stack = build_stack(tiny_cfg.model)
    plain_llm = build_llm(tiny_cfg.model)
    expected = pool(_hidden(plain_llm, batch["llm_input_ids"], batch["llm_attention_mask"]),
                    batch["llm_attention_mask"], "mean")
    torch.testing.assert_close(stack.teacher_pooled(batch["llm_input_ids"], batch["llm_attention_mask"]), expected)
    _train_steps(stack, batch, 3)
    lora_b = [p for n, p in stack.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "training must have moved the LoRA weights"
    teacher_after = stack.teacher_pooled(batch["llm_input_ids"], batch["llm_attention_mask"])
    torch.testing.assert_close(teacher_after, expected)
    # With the adapters on, the same LLM input now gives a different output: the LoRA is live in the student.
    with_adapters = pool(_hidden(stack.llm, batch["llm_input_ids"], batch["llm_attention_mask"]),
                         batch["llm_attention_mask"], "mean")
    assert (with_adapters - expected).abs().max() > 1e-4


def test_only_projection_and_lora_get_gradients(tiny_cfg):
    batch = tokenize_views(tiny_cfg)
    stack = build_stack(tiny_cfg.model)
    out = stack(**batch)
    student_pooled, teacher_pooled = out.student_pooled, out.teacher_pooled
    assert not teacher_pooled.requires_grad
    squared_error(student_pooled, teacher_pooled).mean().backward()
    with_grad = {name for name, p in stack.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable_parameters(stack))
    assert all(name.startswith("projection.") or ".lora_" in name for name in with_grad)
    assert {"projection.weight", "projection.bias"} <= with_grad
    assert any(".lora_A." in name for name in with_grad) and any(".lora_B." in name for name in with_grad)
    assert all(p.grad is None for p in stack.mt_encoder.parameters())
    assert all(p.grad is None for n, p in stack.llm.named_parameters() if ".lora_" not in n)


def test_frozen_modules_stay_in_eval_mode_during_training(tiny_cfg):
    batch = tokenize_views(tiny_cfg)
    stack = build_stack(tiny_cfg.model).train()
    assert stack.projection.training
    assert not any(m.training for m in stack.mt_encoder.modules())
    lora_dropouts = [m for n, m in stack.llm.named_modules() if ".lora_dropout." in n]
    assert lora_dropouts and all(m.training for m in lora_dropouts)
    assert not any(m.training for n, m in stack.llm.named_modules() if ".lora_dropout." not in n)
    # Behaviour, not just flags: the tiny models have dropout 0.1, yet repeated frozen passes agree.
    assert tiny_cfg.model.mt_encoder["dropout"] > 0 and tiny_cfg.model.llm["attention_dropout"] > 0
    first = stack.teacher_pooled(batch["llm_input_ids"], batch["llm_attention_mask"])
    second = stack.teacher_pooled(batch["llm_input_ids"], batch["llm_attention_mask"])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():
        states = [stack.mt_encoder(input_ids=batch["mt_input_ids"], attention_mask=batch["mt_attention_mask"])
                  .last_hidden_state for _ in range(2)]
    torch.testing.assert_close(states[0], states[1], rtol=0, atol=0)
    stack.eval()
    assert not any(m.training for m in stack.modules())


@pytest.mark.parametrize("variant", ["llama", "gpt2", "llama-nf4"])
def test_a_few_steps_on_a_fixed_batch_halve_the_mse(tiny_cfg, variant):
    if variant == "gpt2":
        tiny_cfg.model.llm, tiny_cfg.model.bidirectional = TINY_GPT2, False
    if variant == "llama-nf4":
        tiny_cfg.model.quantization = "nf4"
        tiny_cfg.model.quant_compute_dtype = tiny_cfg.model.quant_storage_dtype = "float32"
    stack = build_stack(tiny_cfg.model)
    if variant == "llama-nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in stack.llm.modules())
    losses = _train_steps(stack, tokenize_views(tiny_cfg), 12)
    assert losses[-1] < 0.5 * losses[0], losses


def test_missing_model_path_names_the_key(tiny_cfg):
    tiny_cfg.model.llm = "./no/such/model"
    with pytest.raises(ConfigError, match=r"model\.llm: './no/such/model' is not a folder"):
        build_llm(tiny_cfg.model)
    tiny_cfg.model.llm = "nobody-has/this-model"
    with pytest.raises(ConfigError, match=r"model\.llm: cannot load 'nobody-has/this-model'"):
        build_llm(tiny_cfg.model)


def test_llm_without_inputs_embeds_is_refused(tiny_cfg):
    tiny_cfg.model.llm = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 8, "patch_size": 4}
    with pytest.raises(ConfigError, match=r"model\.llm: ViTModel does not accept inputs_embeds"):
        build_llm(tiny_cfg.model)


def test_inline_config_without_model_type_is_refused(tiny_cfg):
    tiny_cfg.model.mt_encoder = {"d_model": 64}
    with pytest.raises(ConfigError, match=r"model\.mt_encoder: an inline config needs 'model_type'"):
        build_stack(tiny_cfg.model)


def test_gradients_through_a_4bit_layer_match_its_dequantized_weights():
    import bitsandbytes as bnb

    dense = torch.nn.Linear(64, 32, bias=False)
    quantized = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized = quantized.to("cpu")  # quantizes the weight
    weight = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    assert 0 < (weight - dense.weight).abs().max() < 0.1  # really 4-bit: close, not equal
    for shape in ((3, 5, 64), (1, 64)):
        inputs = torch.randn(*shape, requires_grad=True)
        quantized(inputs).pow(2).sum().backward()
        through_4bit, inputs.grad = inputs.grad.clone(), None
        torch.nn.functional.linear(inputs, weight).pow(2).sum().backward()
        torch.testing.assert_close(through_4bit, inputs.grad)

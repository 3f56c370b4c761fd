"""Shapes that stop changing after the first step of a compiled stage-1 run: batches padded to a length grid,
loader workers that live across epochs, graphs compiled up front for symbolic lengths, no graph breaks. dynamo's
own counters on CPU stand in for the GPU's compiler logs (a recompile there costs seconds per graph)."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

import mtllm_train.distributed as distributed
import mtllm_train.model.fp8 as fp8
import mtllm_train.train as train_module
from conftest import ROOT, preempt_at, read_metrics, trained_weights, train_overrides
from mtllm_train.config import load_config
from mtllm_train.data.reader import collate, padded_length
from mtllm_train.data.shard_writer import build_shards
from mtllm_train.train import train


def test_padded_lengths_round_up_to_the_grid_and_stop_at_max_length():
    assert [padded_length(n, 16, 48) for n in (1, 16, 17, 33, 48)] == [16, 16, 32, 48, 48]
    assert padded_length(37, 1, 48) == 37  # 1: the batch's own longest
    assert padded_length(5, 64, 48) == 48  # a grid coarser than max_length: every batch one shape
    assert padded_length(37, 16, None) == 48
    batch = collate([{"llm": [5, 6, 7], "mt": [9], "llm_words": [0, 0, 1], "mt_words": [0]},
                     {"llm": [8], "mt": [3, 4], "llm_words": [-1], "mt_words": [0, 1]}], {"llm": 0, "mt": 1}, 4, 48)
    assert batch["llm_input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["mt_attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert batch["llm_word_ids"].tolist() == [[0, 0, 1, -1], [-1, -1, -1, -1]]


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory):
    """16 shards of 10 documents of 3 to 40 words: batches of many lengths (the sample's documents all fill 48)."""
    folder = tmp_path_factory.mktemp("varied")
    with open(ROOT / "shards/sample/enwiki_sample.jsonl", encoding="utf-8") as lines:
        words = [json.loads(line)["text"].split() for _, line in zip(range(160), lines)]
    corpus = folder / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(doc[:3 + (7 * i) % 38])}) + "\n"
                              for i, doc in enumerate(words)))
    build_shards([str(corpus)], str(folder / "shards"), "configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer",
                 "eng_Latn", 48, 10, 1, progress=False)
    return folder / "shards"


def _cfg(tmp_path, shards, name, **extra):
    return load_config("configs/tiny.yaml", train_overrides(tmp_path, shards, **{"run.name": name, **extra}))


def test_padding_to_the_length_grid_changes_no_loss_and_resume_stays_bit_identical(tmp_path, varied_shards,
                                                                                   monkeypatch):
    shapes = []
    real_step_batches = train_module.step_batches

    def recording_step_batches(*args, **kwargs):
        micro_batches, counts = real_step_batches(*args, **kwargs)
        shapes.extend(b["mt_input_ids"].shape[1] for b in micro_batches)
        return micro_batches, counts

    monkeypatch.setattr(train_module, "step_batches", recording_step_batches)
    losses = {}
    for multiple in (1, 16, 48):
        shapes.clear()
        name = f"grid{multiple}"
        # LoRA dropout off: its masks are drawn over the padded shape, so padding would change which units drop.
        losses[multiple] = train(_cfg(tmp_path, varied_shards, name, **{
            "data.pad_multiple": multiple, "model.lora.dropout": 0.0, "data.num_workers": 2}))["losses"]
        lengths = set(shapes)
        assert len(lengths) > 1 if multiple < 48 else lengths == {48}
        assert all(length % multiple == 0 for length in lengths) or multiple == 1
    # The pooled vectors ignore padding: the same losses up to float rounding in longer reductions.
    for multiple in (16, 48):
        torch.testing.assert_close(torch.tensor(losses[multiple]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    resumed_settings = {"data.pad_multiple": 16, "model.lora.dropout": 0.0, "data.num_workers": 2}
    with monkeypatch.context() as patch:
        preempt_at(patch, 7)
        train(_cfg(tmp_path, varied_shards, "resumed", **resumed_settings))
    train(_cfg(tmp_path, varied_shards, "resumed", **resumed_settings))
    straight, resumed = trained_weights(tmp_path / "grid16"), trained_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == losses[16]


def _compiled_run(tmp_path, shards, monkeypatch, name, **extra):
    """A compiled 44-step run over 2 epochs with 2 loader workers, batches of varying length on a grid of 16
    tokens: (summary, the step each graph was compiled in, the padded lengths each view met)."""
    compiled_in, shapes, step = [], set(), [0]
    real_step_batches, eager = train_module.step_batches, torch._dynamo.lookup_backend("eager")

    def counting_step_batches(*args, **kwargs):
        step[0] += 1
        micro_batches, counts = real_step_batches(*args, **kwargs)
        shapes.update((b["llm_input_ids"].shape, b["mt_input_ids"].shape) for b in micro_batches)
        return micro_batches, counts

    def recording_backend(graph_module, example_inputs):
        compiled_in.append(step[0])
        return eager(graph_module, example_inputs)

    monkeypatch.setattr(train_module, "step_batches", counting_step_batches)
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", recording_backend)
    cfg = load_config("configs/tiny.yaml", train_overrides(tmp_path, shards, **{
        "run.name": name, "train.steps": 44, "checkpoint.every": 44, "data.num_workers": 2, "data.pad_multiple": 16,
        "model.compile": True, **extra}))
    torch._dynamo.reset()
    counters.clear()
    return train(cfg), compiled_in, shapes


def test_a_compiled_run_compiles_in_its_first_step_only_and_trains_as_the_plain_one(tmp_path, varied_shards,
                                                                                     monkeypatch):
    summary, compiled_in, shapes = _compiled_run(tmp_path, varied_shards, monkeypatch, "compiled")
    assert not counters["graph_break"], dict(counters["graph_break"])
    # All in step 1: the teacher's; the student's first layer's (its input is a view of U's output, which
    # dynamo guards on); the other student layers'. Letting dynamo find the lengths dynamic would make 5.
    assert compiled_in == [1, 1, 1], compiled_in
    llm_lengths, mt_lengths = {llm[1] for llm, _ in shapes}, {mt[1] for _, mt in shapes}
    assert len(llm_lengths | mt_lengths) > 1 and (llm_lengths | mt_lengths) <= {16, 32, 48}, shapes
    assert {llm[0] for llm, _ in shapes} == {4}  # every batch full: the reader drops each buffer's remainder
    assert read_metrics(tmp_path / "compiled")[-1]["epoch"] >= 1  # an epoch boundary was crossed
    plain = train(load_config("configs/tiny.yaml", train_overrides(tmp_path, varied_shards, **{
        "run.name": "plain", "train.steps": 44, "checkpoint.every": 44, "data.num_workers": 2,
        "data.pad_multiple": 16})))
    assert summary["losses"] == plain["losses"]


@pytest.mark.parametrize("quantization", ["nf4", "fp8"])
def test_a_compiled_run_on_a_quantized_base_compiles_in_its_first_step_only(tmp_path, varied_shards, monkeypatch,
                                                                             quantization):
    for module in (fp8, train_module):  # torch's float8 matmul runs on the CPU, which stands in for an H100
        monkeypatch.setattr(module, "check_fp8_support", lambda device: None)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in its first no-grad call (a `.data` swap that
    # dynamo cannot trace); a GPU never takes that path, so the test takes the GPU's.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)
    _, compiled_in, _ = _compiled_run(tmp_path, varied_shards, monkeypatch, quantization,
                                      **{"model.quantization": quantization})
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled_in == [1, 1, 1], compiled_in

"""Stage 1 beyond the paper's MSE: word-span and in-batch contrastive terms, a least-squares start for U, the
collapse diagnostics, held-out evaluation; and where a config's paths resolve."""

import json
import math
import os

import pytest
import torch

from conftest import read_metrics, train_overrides
from helpers import ROOT
from mtllm_train.config import ConfigError, LossConfig, load_config
from mtllm_train.data.reader import BatchReader
from mtllm_train.export import load_trained_stack
from mtllm_train.model.loss import (contrastive_losses, loss_terms, span_count, span_squared_errors, squared_error,
                                    weighted_loss)
from mtllm_train.model.stack import build_stack
from mtllm_train.train import VIEWS, train


def _cfg(tmp_path, shards, name, **extra):
    return load_config(ROOT / "configs/tiny.yaml", train_overrides(tmp_path, shards, **{"run.name": name, **extra}))


def test_span_errors_pool_each_word_span_in_each_view():
    # Student (MT view): tokens 1-2 are word 0, token 3 word 1. Teacher (LLM view): token 1 word 0, tokens 2-3
    # word 1, token 4 word 2 which the student view lacks (it is no target).
    student = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[7.0, 7.0], [2.0, 3.0], [4.0, 6.0], [6.0, 8.0], [1.0, 1.0]]])
    mt_word_ids = torch.tensor([[-1, 0, 0, 1, -1]])
    llm_word_ids = torch.tensor([[-1, 0, 1, 1, 2]])
    errors, teacher_spans = span_squared_errors(student, teacher, mt_word_ids, llm_word_ids)
    # Word 0: student mean (2, 3) vs teacher (2, 3); word 1: student (5, 6) vs teacher mean (5, 7).
    torch.testing.assert_close(teacher_spans, torch.tensor([[2.0, 3.0], [5.0, 7.0]]))
    torch.testing.assert_close(errors, torch.tensor([0.0, 0.5]))
    assert span_count(llm_word_ids, mt_word_ids) == 2


def test_contrastive_term_cannot_be_lowered_by_a_collapsed_student():
    """Plain MSE rewards a student that outputs the teacher's mean for every text; InfoNCE does not."""
    teacher = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    collapsed = teacher.mean(0, keepdim=True).expand(8, 16)  # what plain MSE drifts to: the teacher's mean
    uncorrelated = teacher[torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    assert squared_error(collapsed, teacher).mean() < squared_error(uncorrelated, teacher).mean()
    # One student vector for every text: the mean InfoNCE is at least log(batch), the loss of a guess (Jensen).
    assert contrastive_losses(collapsed, teacher, 0.05).mean() >= math.log(8) - 1e-5
    assert contrastive_losses(teacher, teacher, 0.05).mean() < 0.01


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_shards):
    """40-step runs on the tiny stack, the paper's MSE and MSE + InfoNCE, and one step with U fit by least squares.
    (What each option does to a real stack's learning is measured in bench/mini_repro/RESULTS.md.)"""
    run_dir = tmp_path_factory.mktemp("objectives")
    common = {"train.steps": 20, "checkpoint.every": 20, "model.lora.dropout": 0.0}
    for name, extra in (("mse", {}), ("contrastive", {"loss.contrastive_weight": 1.0}),
                        ("least_squares", {"model.projection_init": "least_squares", "train.steps": 1})):
        train(_cfg(run_dir, train_shards, name, **{**common, **extra}))
    return run_dir


def test_contrastive_term_is_logged_weighed_and_trains(runs):
    mse, contrastive = read_metrics(runs / "mse"), read_metrics(runs / "contrastive")
    assert {"mse", "student_var", "teacher_var", "cosine", "norm_ratio"} <= mse[0].keys()
    assert "contrastive" in contrastive[0] and "contrastive" not in mse[0]
    for record in contrastive:  # the total is the weighted sum of the terms
        assert record["loss"] == pytest.approx(record["mse"] + record["contrastive"])
    # Same data, same start: the first step is the same MSE, then the extra term changes the updates.
    assert contrastive[0]["mse"] == pytest.approx(mse[0]["mse"])
    assert contrastive[-1]["mse"] != pytest.approx(mse[-1]["mse"], rel=1e-3)


def test_least_squares_start_maps_mt_word_states_onto_the_llms_embeddings(runs):
    random_start = read_metrics(runs / "mse")[0]
    fitted_start = read_metrics(runs / "least_squares")[0]
    # Reading the fitted U's output, the LLM is closer to the teacher from the first step (measured on the tiny
    # stack: FVU 3.9 against 7.8, cosine 0.58 against -0.06), and its outputs vary across texts.
    assert fitted_start["fvu"] < 0.7 * random_start["fvu"], (fitted_start["fvu"], random_start["fvu"])
    assert fitted_start["cosine"] > random_start["cosine"] + 0.3
    assert fitted_start["student_var"] > 10 * random_start["student_var"]


def test_span_objective_trains_logs_its_terms_and_needs_shards_with_spans(tmp_path, train_shards):
    summary = train(_cfg(tmp_path, train_shards, "spans", **{"loss.sequence_weight": 1 / 3, "loss.span_weight": 2 / 3,
                                                             "train.steps": 12}))
    records = read_metrics(tmp_path / "spans")
    assert {"span_mse", "span_fvu"} <= records[0].keys()
    for record in records:
        assert record["loss"] == pytest.approx(record["mse"] / 3 + 2 * record["span_mse"] / 3)
    assert sum(r["span_mse"] for r in records[-3:]) < sum(r["span_mse"] for r in records[:3])
    assert summary["end_step"] == 12

    # The same shards declared as the old format: a span run is refused by name, with the way out.
    old = tmp_path / "old_shards"
    old.mkdir()
    for item in train_shards.iterdir():
        (old / item.name).symlink_to(item)
    manifest = json.loads((train_shards / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest.pop("word_spans", None)
    (old / "manifest.json").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"without word spans.*mtllm shards build"):
        train(_cfg(tmp_path, old, "old", **{"loss.span_weight": 1.0}))


def test_the_span_term_reaches_the_gradient_with_its_weight_and_global_count(tiny_cfg, train_shards):
    # The trainer's loss on a real batch: its gradient must be that of the span MSE written out by hand (each span
    # mean-pooled in each view with a loop), weighted, over the step's global span count, plus the sequence term's.
    stack = build_stack(tiny_cfg.model).eval()  # LoRA dropout off: every forward sees the same weights
    batch = next(BatchReader(str(train_shards), batch_size=4, num_workers=0, group_batches=4).first_epoch())
    views = {key: batch[key] for key in VIEWS}
    global_spans = 3.0 * span_count(batch["llm_word_ids"], batch["mt_word_ids"])  # as if 3 such micro-batches

    def projection_gradient(loss_of):
        stack.zero_grad(set_to_none=True)
        loss_of(stack(**views)).backward()
        return stack.projection.weight.grad.clone()

    def by_hand(out):
        total = 0.0
        for sample in range(batch["mt_word_ids"].shape[0]):
            mt_ids, llm_ids = batch["mt_word_ids"][sample], batch["llm_word_ids"][sample]
            for span in set(mt_ids.tolist()) & set(llm_ids.tolist()) - {-1}:
                student = out.student_hidden[sample][mt_ids == span].float().mean(0)
                teacher = out.teacher_hidden[sample][llm_ids == span].float().mean(0)
                total = total + (student - teacher).pow(2).mean()
        sequence = squared_error(out.student_pooled, out.teacher_pooled).sum() / 8.0
        return 0.25 * sequence + 0.75 * total / global_spans

    weights = LossConfig(sequence_weight=0.25, span_weight=0.75)
    counts = {"targets": 8.0, "spans": global_spans}
    trainer = projection_gradient(lambda out: weighted_loss(loss_terms(out, batch, weights).sums(), counts, weights))
    reference = projection_gradient(by_hand)
    sequence_only = projection_gradient(lambda out: 0.25 * squared_error(out.student_pooled,
                                                                         out.teacher_pooled).sum() / 8.0)
    torch.testing.assert_close(trainer, reference, rtol=1e-4, atol=1e-7)
    assert (trainer - sequence_only).norm() > 0.1 * trainer.norm()  # the span term is a real share of it


def test_held_out_evaluation_is_the_mse_of_the_held_out_batches(tmp_path, train_shards):
    train(_cfg(tmp_path, train_shards, "eval", **{"train.steps": 6, "checkpoint.every": 3, "checkpoint.keep_last": 3,
                                                  "data.eval_shards": str(train_shards), "data.eval_every": 3,
                                                  "data.eval_batches": 2, "logging.every": 2}))
    records = {r["step"]: r for r in read_metrics(tmp_path / "eval")}
    assert sorted(records) == [2, 3, 4, 6]  # every 2nd step, and every evaluation even off that grid
    assert {"eval_mse", "eval_fvu"} <= records[3].keys() and "eval_mse" not in records[4]
    # Recompute step 6's evaluation from its checkpoint: the first two batches of the held-out shards.
    stack, _, _ = load_trained_stack(tmp_path / "eval", 6)
    reader = BatchReader(str(train_shards), batch_size=4, num_workers=0, group_batches=4)
    batches = reader.first_epoch()
    errors = []
    with torch.no_grad():
        for _ in range(2):
            batch = next(batches)
            out = stack(**{k: batch[k] for k in VIEWS})
            errors.append(squared_error(out.student_pooled, out.teacher_pooled))
    assert records[6]["eval_mse"] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-5)
    assert records[3]["eval_mse"] != records[6]["eval_mse"]


def test_config_paths_resolve_against_the_file_and_overrides_against_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "project/tok").mkdir(parents=True)
    config = tmp_path / "project/run.yaml"
    config.write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nrun:\n  dir: runs\nmodel:\n  llm_tokenizer: tok\n"
                      f"data:\n  shards: ../shards/mine\n  eval_shards: pipe:cat /data/{{}}\n")
    monkeypatch.chdir(tmp_path / "project/tok")  # anywhere else
    cfg = load_config(config)
    assert cfg.data.shards == str(tmp_path / "shards/mine")
    assert cfg.model.llm_tokenizer == str(tmp_path / "project/tok")
    assert cfg.model.mt_tokenizer == str(ROOT / "configs/tiny/mt_tokenizer")  # from the base, against the base
    assert cfg.data.eval_shards == "pipe:cat /data/{}"
    assert cfg.run.dir == "runs"  # run folders live where the user works
    # A model folder named from the current folder (the paper configs' `models/...`), not beside the config file:
    # absolute, so that config.yaml and an export name it from anywhere; a name found nowhere stays a hub id.
    (tmp_path / "project/tok/models/llm").mkdir(parents=True)
    config.write_text(config.read_text().replace("model:\n", "model:\n  llm: models/llm\n  mt_encoder: org/encoder\n"))
    cfg = load_config(config)
    assert cfg.model.llm == str(tmp_path / "project/tok/models/llm") and cfg.model.mt_encoder == "org/encoder"
    cfg = load_config(config, ["data.shards=here", "model.llm=facebook/nllb-200-distilled-600M",
                               "data.eval_shards=http://127.0.0.1:8000/shards"])
    assert cfg.data.shards == os.path.join(os.getcwd(), "here")
    assert cfg.model.llm == "facebook/nllb-200-distilled-600M"  # a hub id, not a folder here
    assert cfg.data.eval_shards == "http://127.0.0.1:8000/shards"
    with pytest.raises(ConfigError, match=r"data.eval_every: 5 but data.eval_shards is empty"):
        load_config(ROOT / "configs/tiny.yaml", ["data.eval_every=5"])
    with pytest.raises(ConfigError, match=r"in-batch negatives need data.micro_batch_size >= 2"):
        load_config(ROOT / "configs/tiny.yaml", ["loss.contrastive_weight=0.5", "data.micro_batch_size=1"])

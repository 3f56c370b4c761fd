"""The stage-1 trainer in one process (backend none): training, checkpoints, resume, NaN, bad input."""

import json
import shutil
import time

import pytest
import torch

import mtllm_train.model.loss as loss_module
from conftest import preempt_at, read_metrics, trained_weights, train_overrides
from helpers import wandb_records
from mtllm_train.checkpoint import COMMIT, Checkpoints
from mtllm_train.config import ConfigError, load_config
from mtllm_train.export import export_run, load_mtllm, load_trained_stack
from mtllm_train.loop import NonFiniteError
from mtllm_train.portable.tokens import pad_id, pad_right
from mtllm_train.train import train

METRIC_KEYS = {"step", "loss", "fvu", "lr", "grad_norm", "seqs_per_s", "llm_tokens_per_s", "mt_tokens_per_s",
               "padding_efficiency", "data_wait_frac", "peak_mem_gb", "bad_samples", "epoch"}


def _cfg(tmp_path, shards, name, **extra):
    return load_config("configs/tiny.yaml", train_overrides(tmp_path, shards, **{"run.name": name, **extra}))


def test_training_logs_checkpoints_and_exports(tmp_path, train_shards):
    summary = train(_cfg(tmp_path, train_shards, "a", **{"train.steps": 24}))
    run_dir = tmp_path / "a"
    losses = summary["losses"]
    assert summary["end_step"] == 24 and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert METRIC_KEYS <= metrics[0].keys() and metrics[0]["loss"] == pytest.approx(losses[0])
    assert 0 < metrics[-1]["padding_efficiency"] <= 1 and metrics[-1]["lr"] < metrics[5]["lr"]
    # Warmup 10% of 24 steps = 2 steps: lr rises to its peak at step 2, then decays linearly.
    assert metrics[0]["lr"] == pytest.approx(1.5e-3) and metrics[1]["lr"] == pytest.approx(3e-3)
    assert load_config(run_dir / "config.yaml") == _cfg(tmp_path, train_shards, "a", **{"train.steps": 24})
    assert Checkpoints(run_dir).steps() == [20, 24]  # keep_last 2
    # Only trainable parameters (and their optimizer state) are saved, never the frozen base.
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(run_dir / "checkpoints/step_00000024/state")).read_metadata().state_dict_metadata
    stack, _, _ = load_trained_stack(run_dir)
    trainable = {name for name, p in stack.named_parameters() if p.requires_grad}
    assert {key[len("model."):] for key in saved if key.startswith("model.")} == trainable
    assert all(key.startswith(("model.", "optim.")) for key in saved)
    assert any(key.startswith("optim.state.projection.weight.exp_avg") for key in saved)
    # Export and load back with one call: the loaded MT-LLM embeds like the trained stack.
    export = export_run(str(run_dir), str(tmp_path / "export"))
    mtllm = load_mtllm(export)
    texts = ["The old town lies by the river.", "Water boils at a lower temperature in the mountains."]
    embedded = mtllm.encode(texts, lang="eng_Latn")
    ids, mask = pad_right(mtllm.tokenizer(texts)["input_ids"], pad_id(mtllm.tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(embedded, stack.student_pooled(ids, mask))
    assert embedded.shape == (2, 64) and not torch.equal(embedded, mtllm.encode(texts, lang="deu_Latn"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_preempted_and_resumed_run_is_bit_identical(tmp_path, train_shards, monkeypatch, num_workers):
    extra = {"data.num_workers": num_workers}
    train(_cfg(tmp_path, train_shards, "straight", **extra))
    with monkeypatch.context() as patch:
        preempt_at(patch, 7)
        summary = train(_cfg(tmp_path, train_shards, "preempted", **extra))
    assert summary["preempted"] and summary["end_step"] == 7
    assert Checkpoints(tmp_path / "preempted").steps()[-1] == 7
    resumed = train(_cfg(tmp_path, train_shards, "preempted", **extra))
    assert (resumed["start_step"], resumed["end_step"]) == (7, 16)
    straight, preempted = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "preempted")
    assert straight.keys() == preempted.keys()
    assert all(torch.equal(straight[name], preempted[name]) for name in straight)
    assert [m["loss"] for m in read_metrics(tmp_path / "straight")] == [m["loss"] for m in read_metrics(tmp_path / "preempted")]


def test_rerunning_a_finished_run_says_so_and_trains_nothing(tmp_path, train_shards, capsys):
    train(_cfg(tmp_path, train_shards, "done", **{"train.steps": 4}))
    capsys.readouterr()
    summary = train(_cfg(tmp_path, train_shards, "done", **{"train.steps": 4}))
    out = capsys.readouterr().out
    assert "already finished: the run trained its 4 steps" in out and "resumed from" not in out
    assert summary["losses"] == [] and len(read_metrics(tmp_path / "done")) == 4


def test_checkpoint_without_commit_marker_is_skipped(tmp_path, train_shards, monkeypatch):
    with monkeypatch.context() as patch:
        preempt_at(patch, 8)
        train(_cfg(tmp_path, train_shards, "r", **{"train.steps": 16}))
    checkpoints = tmp_path / "r" / "checkpoints"
    shutil.copytree(checkpoints / "step_00000008", checkpoints / "step_00000012")
    (checkpoints / "step_00000012" / COMMIT).unlink()  # a save that died before its marker
    summary = train(_cfg(tmp_path, train_shards, "r", **{"train.steps": 16}))
    assert summary["start_step"] == 8 and summary["end_step"] == 16
    assert Checkpoints(tmp_path / "r").steps() == [12, 16]
    assert (checkpoints / "step_00000012" / COMMIT).is_file()


def test_non_finite_loss_stops_the_run_and_leaves_no_nan_checkpoint(tmp_path, train_shards, monkeypatch):
    calls = {"n": 0}
    real = loss_module.squared_error

    def poisoned(student, teacher):
        calls["n"] += 1
        errors = real(student, teacher)
        return errors * float("nan") if calls["n"] > 12 else errors  # 2 micro-batches a step: step 7 is bad

    monkeypatch.setattr(loss_module, "squared_error", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 7: the loss is nan; the step was not applied"):
        train(_cfg(tmp_path, train_shards, "nan"))
    assert Checkpoints(tmp_path / "nan").steps() == [4]
    assert all(torch.isfinite(p).all() for p in trained_weights(tmp_path / "nan").values())
    assert len(read_metrics(tmp_path / "nan")) == 6


def test_resume_with_another_world_size_is_refused(tmp_path, train_shards):
    train(_cfg(tmp_path, train_shards, "w", **{"train.steps": 4}))
    meta_path = tmp_path / "w" / "checkpoints" / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(ConfigError, match=r"was written by 2 ranks, this run has 1: .*resume with 2 ranks"):
        train(_cfg(tmp_path, train_shards, "w", **{"train.steps": 4}))


def test_user_errors_give_clear_messages(tmp_path, train_shards, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.global_batch_size 10 is not a multiple of data.micro_batch_size 4 "
                                          r"x world size 1 = 4"):
        train(_cfg(tmp_path, train_shards, "e1", **{"train.global_batch_size": 10}))
    with pytest.raises(ConfigError, match=r"LLM view with 'configs/tiny/llm_tokenizer' .* but the run uses "
                                          r"'\S*configs/tiny/mt_tokenizer'"):
        train(_cfg(tmp_path, train_shards, "e2", **{"model.llm_tokenizer": "configs/tiny/mt_tokenizer"}))
    with pytest.raises(ConfigError, match=r"shards '.*nowhere': no manifest.json"):
        train(_cfg(tmp_path, train_shards, "e3", **{"data.shards": str(tmp_path / "nowhere")}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"distributed.backend: 'none' cannot run on 2 processes"):
        train(_cfg(tmp_path, train_shards, "e4"))


def test_wandb_offline_run_continues_with_the_same_id_after_resume(tmp_path, train_shards, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    extra = {"logging.wandb": "offline", "train.steps": 8}
    with monkeypatch.context() as patch:
        preempt_at(patch, 3)
        train(_cfg(tmp_path, train_shards, "wb", **extra))
    first_id = json.loads((tmp_path / "wb/checkpoints/step_00000003/meta.json").read_text())["wandb_id"]
    train(_cfg(tmp_path, train_shards, "wb", **extra))
    final_id = json.loads((tmp_path / "wb/checkpoints/step_00000008/meta.json").read_text())["wandb_id"]
    runs = sorted(p.name for p in (tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert first_id and final_id == first_id
    assert len(runs) == 2 and all(name.endswith(first_id) for name in runs)
    # What the run sent: grouped and tagged by stage and command, metrics by section, the plot as an artifact.
    records = wandb_records(next((tmp_path / "wb" / "wandb").glob(f"{runs[-1]}/run-*.wandb")))
    run = next(r.run for r in records if r.HasField("run"))
    assert (run.run_group, list(run.tags), run.job_type) == ("wb", ["stage1", "train"], "train")
    logged = {item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item}
    assert {"train/loss", "train/fvu", "train/lr"} <= logged and "loss" not in logged
    assert [(r.artifact.type, r.artifact.name) for r in records if r.HasField("artifact")] == [("plot", "wb-loss-curve")]


def test_wandb_groups_a_stage2_run_with_its_stage1_run_and_names_metrics_by_section():
    from mtllm_train.config import LoggingConfig, to_dict
    from mtllm_train.metrics import wandb_group, wandb_key

    stage2 = to_dict(load_config("configs/tiny_sentiment.yaml", ["task.init_from=runs/mine"]))
    assert wandb_group(LoggingConfig(), stage2) == "mine"
    assert wandb_group(LoggingConfig(group="ablation"), stage2) == "ablation"
    assert [wandb_key(k) for k in ("loss", "eval_mse", "probe_stack_mean", "dev/source")] == [
        "train/loss", "eval/mse", "probe/stack_mean", "dev/source"]


def test_wandb_online_without_a_key_or_a_server_logs_offline_with_one_line_and_wandb_mode_wins(
        tmp_path, train_shards, monkeypatch, capsys):
    from mtllm_train.config import LoggingConfig
    from mtllm_train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    started = time.perf_counter()
    train(_cfg(tmp_path, train_shards, "wb_online", **{"logging.wandb": "online", "train.steps": 2}))
    assert time.perf_counter() - started < 60
    out = capsys.readouterr().out
    assert out.count("W&B: logging.wandb is online but there is no API key") == 1
    assert list((tmp_path / "wb_online" / "wandb").glob("offline-run-*"))  # logged offline, nothing lost
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://nowhere.invalid")  # a server that does not answer
    mode, note = wandb_mode(LoggingConfig(wandb="online"))
    assert mode == "offline" and "nowhere.invalid does not answer" in note
    monkeypatch.setenv("WANDB_MODE", "loud")
    with pytest.raises(ConfigError, match=r"WANDB_MODE='loud' in the environment: expected one of"):
        wandb_mode(LoggingConfig(wandb="online"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # exported in a cluster job: it wins over the config
    assert wandb_mode(LoggingConfig(wandb="online")) == ("offline", "W&B: WANDB_MODE=offline from the environment "
                                                                    "(logging.wandb: online)")


def test_activation_checkpointing_recomputes_and_gives_the_same_losses(tmp_path, train_shards, monkeypatch):
    import transformers.modeling_utils

    extra = {"train.steps": 4}  # LoRA dropout on: the recompute draws the forward's masks again
    plain = train(_cfg(tmp_path, train_shards, "plain", **extra))["losses"]
    recomputed, checkpoint = [], transformers.modeling_utils.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        recomputed.append(torch.is_grad_enabled())
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    # true: the older form of the setting, still accepted (full)
    checkpointed = train(_cfg(tmp_path, train_shards, "ckpt", **{**extra, "model.activation_checkpointing": True}))
    # Every LLM layer checkpoints in each student forward: 2 layers x 2 micro-batches x 4 steps.
    assert recomputed.count(True) == 2 * 2 * 4
    torch.testing.assert_close(torch.tensor(checkpointed["losses"]), torch.tensor(plain), rtol=1e-5, atol=1e-7)


def test_stop_file_checkpoints_and_stops_then_the_rerun_continues(tmp_path, train_shards):
    (tmp_path / "stop").mkdir()
    (tmp_path / "stop" / "STOP").touch()  # what launch/slurm_multinode.sbatch does before the time limit
    summary = train(_cfg(tmp_path, train_shards, "stop", **{"train.steps": 8}))
    assert summary["preempted"] and summary["end_step"] == 1
    assert not (tmp_path / "stop" / "STOP").exists()
    assert Checkpoints(tmp_path / "stop").steps() == [1]
    assert train(_cfg(tmp_path, train_shards, "stop", **{"train.steps": 8}))["end_step"] == 8


def test_log_lines_without_a_terminal_and_the_plot_marks_resumes(tmp_path, train_shards, monkeypatch, capsys):
    from mtllm_train.metrics import loss_figure

    extra = {"train.steps": 20, "logging.progress_bar": True, "data.eval_every": 10, "data.eval_shards": str(train_shards)}
    with monkeypatch.context() as patch:
        preempt_at(patch, 8)
        train(_cfg(tmp_path, train_shards, "log", **extra))
    train(_cfg(tmp_path, train_shards, "log", **extra))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    # Not a terminal (pytest captures stderr): one plain line every 5% of the run, no bar frames.
    assert [line.split()[1] for line in lines] == [f"{step}/20" for step in range(1, 21)]
    assert all(" loss " in line and " fvu " in line and " eta " in line for line in lines)
    # Held-out evaluations are on the console too, when they happen.
    assert [line.split()[1] for line in lines if " held-out mse " in line] == ["10/20", "20/20"]
    records = read_metrics(tmp_path / "log")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert [r["step"] for r in records if r.get("resumed")] == [9]
    figure = loss_figure(records, "log")
    assert [axis.get_title() for axis in figure.axes] == ["loss", "FVU", "learning rate",
                                                          "gradient norm"]
    assert [line.get_xdata()[0] for line in figure.axes[0].lines[1:]] == [8]  # the resume mark
    assert list(figure.axes[1].lines[-1].get_ydata()) == [1.0, 1.0]  # the FVU = 1 line
    assert (tmp_path / "log" / "loss_curve.png").stat().st_size > 10_000


def test_only_rank_0_shows_transformers_loading_output():
    from transformers.utils import logging as transformers_logging

    from mtllm_train.distributed import quiet_other_ranks

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.enable_progress_bar()  # other tests (predict) turn it off for their process
    try:
        quiet_other_ranks(0)
        assert transformers_logging.get_verbosity() == verbosity and transformers_logging.is_progress_bar_enabled()
        quiet_other_ranks(1)
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def test_the_last_step_is_logged_off_the_logging_grid_and_a_lone_process_ignores_an_exported_master_addr(
        tmp_path, train_shards, monkeypatch):
    # MASTER_ADDR exported for other jobs, no RANK: this is still a lone process (its 1-rank group set up here).
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    train(load_config("configs/tiny.yaml", train_overrides(tmp_path, train_shards, **{
        "run.name": "grid", "train.steps": 7, "logging.every": 5, "distributed.backend": "ddp"})))
    assert [record["step"] for record in read_metrics(tmp_path / "grid")] == [5, 7]


def test_a_finished_run_continues_into_a_longer_one(tmp_path, train_shards, capsys):
    """train.init_from: the new run's first loss is the source run's final weights on the same first batch; a
    source of other shapes or a stage-2 run is one line."""
    from mtllm_train.distributed import Dist
    from mtllm_train.model.loss import squared_error
    from mtllm_train.train import VIEWS, shard_reader

    quiet = {"model.lora.dropout": 0.0, "data.num_workers": 0}
    first = train(_cfg(tmp_path, train_shards, "first", **{"train.steps": 4, **quiet}))
    longer = train(_cfg(tmp_path, train_shards, "longer", **{"train.steps": 4, "train.init_from": tmp_path / "first",
                                                              **quiet}))
    assert f"started from {tmp_path / 'first' / 'checkpoints' / 'step_00000004'}" in capsys.readouterr().out
    stack, _, _ = load_trained_stack(tmp_path / "first")
    cfg = _cfg(tmp_path, train_shards, "longer", **quiet)
    stream = iter(shard_reader(cfg, cfg.data.shards, 0, Dist(0, 1, 0, torch.device("cpu"))))  # its first batches
    with torch.no_grad():
        errors = [squared_error(out.student_pooled, out.teacher_pooled) for out in
                  (stack(**{k: batch[k] for k in VIEWS}) for batch in (next(stream), next(stream)))]
    assert longer["losses"][0] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-5)
    assert abs(first["losses"][0] - longer["losses"][0]) > 1e-3  # not the initial weights on that batch
    for bad, message in (({"model.lora.r": 4}, r"train\.init_from: \S+/first trained other shapes than this run's "),
                         ({}, r"train\.init_from: \S+/s2 is a stage-2 run")):
        source = tmp_path / ("s2" if not bad else "first")
        if not bad:
            source.mkdir()
            (source / "task.json").write_text(json.dumps({"command": "task-train", "kind": "llm"}))
        with pytest.raises(ConfigError, match=message):
            train(_cfg(tmp_path, train_shards, f"bad{len(bad)}", **{"train.steps": 2, "train.init_from": source,
                                                                    **bad}))

"""Fault behaviour a cluster user can trust: one table of fault cases (what goes wrong, what must happen), each
run for real on the tiny config. Input mistakes (config values, manifests, input files) have their own table
in tests/test_input_faults.py.

Every case ends in a clear one-line error (exit code 2; 1 for a run stopped by non-finite numbers) or in a
documented safe behaviour; none hangs, none loses or silently changes a result. FAULTS is the table: a case
leaves it only by being deleted from both places, which the last test notices.
"""

import json
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.utils import _wrap_exception

import mtllm_train.checkpoint as checkpoint_module
import mtllm_train.loop as loop_module
import mtllm_train.train as train_module
from conftest import ROOT, read_metrics, trained_weights, train_overrides
from helpers import child_pids, finish, running, subprocess_env, torchrun
from mtllm_train.__main__ import main
from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import load_config
from mtllm_train.export import export_run, load_mtllm
from mtllm_train.files import sha256_file


def _train_args(run_dir, shards, name, **extra):
    return ["train", "--config", "configs/tiny.yaml",
            *train_overrides(run_dir, shards, **{"run.name": name, "train.steps": 12, **extra})]


def _run(capsys, *args):
    """`mtllm <args>` in this process: (exit code, stderr lines)."""
    code = main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _cli(args, timeout=120):
    """`mtllm <args>` in a fresh process (a hang shows as a timeout): (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-m", "mtllm_train", *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def _shards_copy(train_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(train_shards, copy)
    return copy


def _restamp(shards, name):
    """Record shard `name`'s current bytes in the manifest: the damage then passes the checksum, as a shard
    written damaged would, and the reader's own checks must catch it."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["sha256"] = sha256_file(shards / name)
    (shards / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path, keep=0.5):
    """Cut the file to about `keep` of its bytes; a tar inside a member's data (a cut between members reads as a
    shorter archive, not a damaged one)."""
    data = path.read_bytes()
    cut = int(len(data) * keep)
    if path.suffix == ".tar" and cut:
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.offset_data + m.size > cut)
        cut = member.offset_data + member.size // 2
    path.write_bytes(data[:cut])


# --- 1. a reader that fails stops the run in seconds, on every rank --------------------------------------------

@pytest.mark.parametrize("workers", [0, 1, 2])
def test_unreadable_shard_stops_at_once(tmp_path, train_shards, capsys, workers):
    shards = _shards_copy(train_shards, tmp_path)
    _truncate(shards / "shard-000000.tar")
    _restamp(shards, "shard-000000.tar")  # past the checksum: the tar reader itself fails, inside a worker
    start = time.perf_counter()
    code, err = _cli(_train_args(tmp_path, shards, "bad", **{"data.num_workers": workers}), timeout=90)
    assert code == 2 and time.perf_counter() - start < 60
    assert err.strip().splitlines() == [err.strip()] and "shard-000000.tar: unreadable at sample" in err, err


def test_one_rank_with_bad_data_stops_both(tmp_path, train_shards, capsys):
    shards = _shards_copy(train_shards, tmp_path)
    for name in ("shard-000000.tar", "shard-000001.tar"):  # whichever shard rank 1 opens first
        _truncate(shards / name, 0.1)
        _restamp(shards, name)
    start = time.perf_counter()
    process = torchrun(*_train_args(tmp_path, shards, "two", **{"distributed.backend": "ddp", "data.num_workers": 1}))
    code, output = finish(process, timeout=120)
    assert code != 0 and time.perf_counter() - start < 90, output[-2000:]
    assert "unreadable at sample" in output, output[-2000:]


# --- 2. shards are verified before use; skipping counts every dropped sample --------------------------------

@pytest.mark.parametrize("damage", ["flipped token byte", "truncated", "missing"])
def test_damaged_shard_is_refused(tmp_path, train_shards, capsys, damage):
    shards = _shards_copy(train_shards, tmp_path)
    shard = shards / "shard-000003.tar"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        _truncate(shard)
    else:
        data = bytearray(shard.read_bytes())
        data[2048 + 140] ^= 0x40  # inside the first sample's llm.npy payload
        shard.write_bytes(bytes(data))
    code, err = _run(capsys, *_train_args(tmp_path, shards, "d", **{"data.num_workers": 0}))
    expected = "missing (listed in the manifest)" if damage == "missing" else "checksum mismatch"
    assert code == 2 and len(err) == 1 and "shard-000003.tar" in err[0] and expected in err[0], err
    if damage == "missing":  # found when the reader opens the folder, before any batch is read
        from mtllm_train.data.reader import BatchReader
        from mtllm_train.data.tar_reader import ShardError

        with pytest.raises(ShardError, match=r"shard-000003\.tar: missing \(listed in the manifest\)"):
            BatchReader(str(shards), num_workers=0)


def test_skip_bad_samples_counts_every_dropped_sample(tmp_path, train_shards, capsys):
    shards = _shards_copy(train_shards, tmp_path)
    _truncate(shards / "shard-000003.tar")
    code, err = _run(capsys, *_train_args(tmp_path, shards, "skip", **{"data.skip_bad_samples": "true",
                                                                        "data.num_workers": 0}))
    assert code == 0, err
    dropped = sum(record["bad_samples"] for record in read_metrics(tmp_path / "skip"))
    assert dropped > 0 and dropped % 10 == 0, dropped  # the whole shard (10 samples), once per pass over it


def test_manifest_sample_count_is_checked_against_the_shard(tmp_path, train_shards, capsys):
    shards = _shards_copy(train_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["totals"]["samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(capsys, *_train_args(tmp_path, shards, "count", **{"data.num_workers": 0}))
    assert code == 2 and "shard-000000.tar: holds 10 samples, the manifest says 11" in err[0], err


# --- 3. checkpoints unpickle nothing they do not have to -------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_crafted_checkpoint_metadata_runs_no_code(tmp_path, train_shards, capsys):
    run = tmp_path / "m"
    assert main(_train_args(tmp_path, train_shards, "m", **{"train.steps": 4})) == 0
    step = run / "checkpoints" / "step_00000004"
    (step / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["state/.metadata"] = sha256_file(step / "state" / ".metadata")  # the attacker fixes the sums
    meta["sizes"]["state/.metadata"] = (step / "state" / ".metadata").stat().st_size  # and the sizes
    (step / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    for args in (["export", "--run", run], _train_args(tmp_path, train_shards, "m", **{"train.steps": 4})):
        code, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and "refused" in err[0] and "builtins.exec" in err[0], err
    assert not (tmp_path / "PWNED").exists()


# --- 4. one trainer per run folder -----------------------------------------------------------------------------

def test_second_trainer_on_a_run_folder_is_refused(tmp_path, train_shards, capsys):
    args = _train_args(tmp_path, train_shards, "busy", **{"train.steps": 400, "checkpoint.every": 200})
    first = subprocess.Popen([sys.executable, "-m", "mtllm_train", *args], cwd=ROOT, env=subprocess_env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "busy" / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.1)
        code, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and "is in use by another trainer (host " in err[0], err
        assert f"pid {first.pid}" in err[0]
    finally:
        first.terminate()  # a preemption: it checkpoints and exits 0
        assert first.wait(timeout=60) == 0, first.stderr.read()[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "busy")] == list(range(1, len(read_metrics(tmp_path / "busy")) + 1))


def test_a_trainer_killed_outright_frees_its_run_folder_at_once(tmp_path, train_shards):
    """kill -9 (the OOM killer, a scheduler) of a trainer with 2 loader workers: the run folder is free at once
    (the workers it forked never held the lock) and the workers end with it."""
    import os
    import signal

    from mtllm_train.distributed import Dist
    from mtllm_train.run_folder import RunFolder, _held_locks, lock_run_folder

    args = _train_args(tmp_path, train_shards, "killed", **{"train.steps": 400, "checkpoint.every": 200,
                                                            "data.num_workers": 2})
    trainer = subprocess.Popen([sys.executable, "-m", "mtllm_train", *map(str, args)], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # metrics.jsonl is created before the loader forks its workers: wait for the workers themselves
    deadline, workers = time.time() + 120, []
    while not workers and trainer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        workers = child_pids(trainer.pid)  # the loader workers (as many as have started)
    assert workers, f"no loader worker started (trainer exit code {trainer.poll()})"
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait(timeout=10)
    run = RunFolder(tmp_path / "killed")
    lock_run_folder(run, Dist(0, 1, 0, torch.device("cpu")))  # no "in use by another trainer": the lock is free
    os.close(_held_locks.pop(run.path.resolve()))
    deadline = time.time() + 10
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers)), "loader workers outlived the trainer"


def test_ranks_stop_with_their_launcher(tmp_path, train_shards):
    """The torchrun agent killed outright: both ranks checkpoint at the step's end and stop, none trains on."""
    import os
    import signal

    process = torchrun(*_train_args(tmp_path, train_shards, "orphans", **{
        "distributed.backend": "ddp", "train.steps": 2000, "checkpoint.every": 1000, "data.num_workers": 0}))
    deadline = time.time() + 90
    while not (tmp_path / "orphans" / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.1)
    ranks = child_pids(process.pid)
    assert len(ranks) == 2, ranks
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.time() + 60
    while any(map(running, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(running, ranks)), "ranks trained on without their launcher"
    saved = Checkpoints(tmp_path / "orphans").steps()
    assert len(saved) == 1 and 0 < saved[0] < 2000  # a preemption's checkpoint: nothing lost


def test_resume_reads_the_settings_its_checkpoints_record(tmp_path, train_shards, capsys):
    """config.yaml deleted: a changed lr is still refused; config.yaml edited: export still rebuilds the model
    the checkpoints hold."""
    args = _train_args(tmp_path, train_shards, "rec", **{"checkpoint.every": 4, "train.steps": 8})
    assert main(args) == 0
    (tmp_path / "rec" / "config.yaml").unlink()
    code, err = _run(capsys, *args, "optim.lr=0.1")
    assert code == 2 and len(err) == 1 and "optim.lr: the checkpoints in" in err[0], err
    assert not (tmp_path / "rec" / "config.yaml").exists()
    edited = load_config(ROOT / "configs" / "tiny.yaml", ["model.lora.r=4"])
    from mtllm_train.config import dump_config

    dump_config(edited, tmp_path / "rec" / "config.yaml")
    model = load_mtllm(export_run(str(tmp_path / "rec"), str(tmp_path / "rec_export")))
    assert model.llm.peft_config["default"].r == 8  # the rank the checkpoints were trained with


def test_a_tar_member_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, train_shards, capsys):
    shards = _shards_copy(train_shards, tmp_path)
    shard = shards / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    header = data[512 * 2:512 * 3]  # the second member's header (the first sample's llm.npy)
    header[124:136] = b"%011o\0" % (3 * 10**9)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[512 * 2:512 * 3] = header
    shard.write_bytes(bytes(data))
    _restamp(shards, "shard-000000.tar")
    code, err = _run(capsys, *_train_args(tmp_path, shards, "big", **{"data.num_workers": 0}))
    assert code == 2 and len(err) == 1 and "declares 3000000000 bytes, more than a sample member holds" in err[0], err


def test_a_checkpoint_listing_a_huge_file_is_refused_without_hashing_it(tmp_path, train_shards, capsys):
    run = tmp_path / "huge"
    assert main(_train_args(tmp_path, train_shards, "huge", **{"train.steps": 4})) == 0
    step = run / "checkpoints" / "step_00000004"
    with (step / "padding.bin").open("wb") as sparse:  # 64 GiB that take no disk: hashing them would take minutes
        sparse.truncate(1 << 36)
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["padding.bin"], meta["sizes"]["padding.bin"] = "0" * 64, 1 << 36
    (step / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    start = time.perf_counter()
    code, err = _run(capsys, "export", "--run", run)
    assert code == 2 and len(err) == 1 and "more than a checkpoint of this model's trainable weights can" in err[0], err
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("content, expected", [
    ("a: &x [1, 2]\nb: *x\n", "YAML aliases (*name) are not read"),
    (b"run:\n  name: \xff\xfe\n", "is not UTF-8 text"),
    ("# " + "x" * (1 << 20) + "\n", "a config is at most 1048576"),
])
def test_config_parsing_is_bounded(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = _run(capsys, "config", "--config", path)
    assert code == 2 and len(err) == 1 and expected in err[0], err


# --- 5. settings are checked against the checkpoints before anything is written --------------------------------

@pytest.mark.parametrize("override, expected", [
    ("model.lora.r=4", r"model.lora.r: the checkpoints in .* were trained with 8, this command gives 4"),
    ("optim.lr=0.1", r"optim.lr: the checkpoints in .* were trained with 0.003, this command gives 0.1"),
    ("train.steps=16", r"train.steps: the checkpoints in .* were trained with 12, this command gives 16"),
])
def test_resume_with_other_settings_is_refused(tmp_path, train_shards, capsys, override, expected):
    args = _train_args(tmp_path, train_shards, "s", **{"checkpoint.every": 4})
    assert main(args) == 0
    config_before = (tmp_path / "s" / "config.yaml").read_text()
    code, err = _run(capsys, *args, override)
    assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
    assert (tmp_path / "s" / "config.yaml").read_text() == config_before
    export_run(str(tmp_path / "s"), str(tmp_path / "export"))  # the run is still whole


def test_resume_may_change_how_it_logs_and_checkpoints(tmp_path, train_shards, capsys):
    args = _train_args(tmp_path, train_shards, "ok", **{"checkpoint.every": 4, "train.steps": 8})
    assert main(args) == 0
    assert main([*args, "logging.every=2", "checkpoint.keep_last=3", "distributed.timeout_minutes=5"]) == 0
    assert load_config(tmp_path / "ok" / "config.yaml").checkpoint.keep_last == 3


# --- 6. non-finite weights never reach a checkpoint or an export ------------------------------------------------

def test_non_finite_weights_are_never_saved(tmp_path, train_shards, capsys, monkeypatch):
    real_step = loop_module.optimizer_step

    def poisoning_step(model, optimizer, *args):
        norm = real_step(model, optimizer, *args)
        if optimizer.state and next(iter(optimizer.state.values()))["step"] >= 6:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
        return norm

    monkeypatch.setattr(train_module, "optimizer_step", poisoning_step)
    code, err = _run(capsys, *_train_args(tmp_path, train_shards, "inf", **{"checkpoint.every": 2}))
    assert code == 1 and err == ["mtllm: stopped: step 6: trainable weights or optimizer state are not finite "
                                 "(optim.lr too high?); not saved: a rerun resumes from the newest checkpoint"], err
    assert Checkpoints(tmp_path / "inf").steps() == [2, 4]
    assert all(torch.isfinite(p).all() for p in trained_weights(tmp_path / "inf").values())


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path, train_shards, capsys):
    run = tmp_path / "nf"
    assert main(_train_args(tmp_path, train_shards, "nf", **{"train.steps": 4})) == 0
    from mtllm_train.export import load_trained_stack

    stack, _, _ = load_trained_stack(run)
    with torch.no_grad():
        stack.projection.bias[0] = float("nan")
    optimizer = torch.optim.AdamW([p for p in stack.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Checkpoints(run, model=stack, optimizer=optimizer, scheduler=scheduler).save(8, meta={}, keep_last=2)
    capsys.readouterr()
    code, err = _run(capsys, "export", "--run", run)
    assert code == 2 and err == [f"mtllm: error: checkpoint {run}/checkpoints/step_00000008 holds non-finite weights; "
                                 f"choose an earlier step (complete: 4, 8)"], err
    assert _run(capsys, "export", "--run", run, "--step", 4)[0] == 0


def test_deepspeed_says_a_non_finite_step_was_applied_and_saves_nothing(tmp_path, train_shards, capsys, monkeypatch):
    real_build = train_module.build_stack

    def stack_with_exploding_gradient(model_cfg, device):
        stack = real_build(model_cfg, device)
        calls = {"n": 0}

        def explode(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] > 10 else grad  # 2 micro-batches a step: step 6 on

        stack.projection.bias.register_hook(explode)
        return stack

    monkeypatch.setattr(train_module, "build_stack", stack_with_exploding_gradient)
    code, err = _run(capsys, *_train_args(tmp_path, train_shards, "ds", **{
        "distributed.backend": "deepspeed", "optim.name": "adamw", "checkpoint.every": 2}))
    assert code == 1 and err[-1] == ("mtllm: stopped: step 6: the gradient norm is inf; DeepSpeed applied the step; "
                                     "it is not saved"), err
    assert Checkpoints(tmp_path / "ds").steps() == [2, 4]


# --- 7. a damaged newest checkpoint is reported and the one before it resumed ---------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, train_shards):
    root = tmp_path_factory.mktemp("finished")
    assert main(_train_args(root, train_shards, "run", **{"checkpoint.every": 4})) == 0
    return root


@pytest.mark.parametrize("damage", ["truncated tensor file", "truncated .metadata", "truncated rank file",
                                    "empty meta.json", "flipped bit"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, train_shards, finished_run, capsys, damage):
    shutil.copytree(finished_run / "run", tmp_path / "run")
    step = tmp_path / "run" / "checkpoints" / "step_00000012"
    target = {"truncated tensor file": next((step / "state").glob("*.distcp")),
              "truncated .metadata": step / "state" / ".metadata", "truncated rank file": step / "rank_0.pt",
              "empty meta.json": step / "meta.json", "flipped bit": next((step / "state").glob("*.distcp"))}[damage]
    if damage == "flipped bit":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    else:
        _truncate(target, 0.0 if damage == "empty meta.json" else 0.5)
    code = main(_train_args(tmp_path, train_shards, "run", **{"checkpoint.every": 4}))
    out, err = capsys.readouterr()
    assert code == 0 and err.startswith(f"mtllm: checkpoint {step} is damaged ("), err
    assert "steps 8 -> 12" in out, out
    expected, resumed = trained_weights(finished_run / "run"), trained_weights(tmp_path / "run")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)  # bit-identical
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))


def test_a_users_copy_of_a_step_folder_is_neither_a_checkpoint_nor_deleted(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    for name, complete in (("step_00000004", True), ("step_00000008", True), ("step_00000008.bak", True),
                           ("step_00000012", False)):
        (checkpoints.folder / name).mkdir(parents=True)
        if complete:
            (checkpoints.folder / name / "COMPLETE").write_text(name)
    assert checkpoints.steps() == [4, 8]  # it crashed on the copy's name
    checkpoints._prune(8, checkpoints.folder / "step_00000008", keep_last=2, keep_steps=None)
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == ["step_00000004", "step_00000008",
                                                                     "step_00000008.bak"]  # the interrupted 12 gone


def test_every_checkpoint_damaged_stops_every_rank_with_the_same_line(tmp_path, train_shards):
    settings = {"distributed.backend": "ddp", "checkpoint.every": 4, "train.steps": 8}
    code, output = finish(torchrun(*_train_args(tmp_path, train_shards, "run", **settings)), timeout=120)
    assert code == 0, output[-2000:]
    for step in (4, 8):
        _truncate(tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "rank_0.pt", 0.5)
    code, output = finish(torchrun(*_train_args(tmp_path, train_shards, "run", **settings)), timeout=120)
    # Rank 1 raises the same error as rank 0 (it waited in a collective rank 0 never joined, and died of gloo's
    # "connection closed" before).
    assert code != 0 and "Connection closed" not in output, output[-3000:]
    assert output.count("every complete checkpoint is damaged (see above); start a new run.name") == 2, output[-3000:]


def test_a_save_after_going_back_past_damaged_checkpoints_keeps_the_sound_ones(tmp_path, train_shards,
                                                                               finished_run, capsys):
    # Checkpoints 4, 8 and 12, the last two damaged, keep_last 2: the run goes back to step 4 and is preempted at
    # step 5. Pruning by step number alone would keep the damaged 8 and 12 and delete 4 and 5, just saved.
    assert main(_train_args(tmp_path, train_shards, "run", **{"checkpoint.every": 4, "checkpoint.keep_last": 3})) == 0
    assert Checkpoints(tmp_path / "run").steps() == [4, 8, 12]
    for step in (8, 12):
        _truncate(tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "rank_0.pt", 0.5)
    (tmp_path / "run" / "STOP").touch()
    args = _train_args(tmp_path, train_shards, "run", **{"checkpoint.every": 4, "checkpoint.keep_last": 2})
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0 and "preempted: saved step 5" in out + err, out + err
    assert Checkpoints(tmp_path / "run").steps() == [4, 5]  # the abandoned 8 and 12 are gone, the sound ones kept
    assert main(args) == 0 and Checkpoints(tmp_path / "run").steps() == [8, 12]
    expected, resumed = trained_weights(finished_run / "run"), trained_weights(tmp_path / "run")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)  # bit-identical after all that


# --- 8. metrics.jsonl holds every step once after a crash and resume -------------------------------------------

def test_metrics_after_a_crash_hold_every_step_once(tmp_path, train_shards, capsys):
    args = _train_args(tmp_path, train_shards, "crash", **{"checkpoint.every": 4})
    assert main(args) == 0
    shutil.rmtree(tmp_path / "crash" / "checkpoints" / "step_00000012")  # as if killed after step 11
    with (tmp_path / "crash" / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 12, "lo')  # and in the middle of a line
    assert main(args) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == list(range(1, 13))


# --- 9 (the rest). a full disk during a checkpoint ------------------------------------------------------------

ENOSPC = OSError(28, "No space left on device")
# How a full disk shows at each write of a checkpoint (seen on a full tmpfs): (what fails, the error, its reason).
FULL_DISK = {
    "rank file, OSError": ("torch.save", ENOSPC, "No space left on device"),
    "rank file, torch's zip writer": ("torch.save", RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write "
        "failed"), "PytorchStreamWriter failed writing file"),
    "sharded state, torch.distributed.checkpoint": ("dcp.save", CheckpointException(
        "save", {0: _wrap_exception(ENOSPC)}), "No space left on device"),
    "meta.json, after every rank wrote": ("write_atomic", ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, train_shards, capsys, monkeypatch, case):
    target, error, reason = FULL_DISK[case]
    module, name = {"torch.save": (torch, "save"), "dcp.save": (checkpoint_module.dcp, "save"),
                    "write_atomic": (checkpoint_module, "write_atomic")}[target]
    real = getattr(module, name)

    def full_disk(*args, **kwargs):
        if any("step_00000008" in str(arg) for arg in (*args, *kwargs.values())):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, full_disk)
    code, err = _run(capsys, *_train_args(tmp_path, train_shards, "full", **{"checkpoint.every": 4}))
    assert code == 2 and len(err) == 1 and "checkpoint step 8: cannot write" in err[0] and \
        reason in err[0] and "earlier checkpoints are intact" in err[0], err
    assert Checkpoints(tmp_path / "full").steps() == [4]
    assert not (tmp_path / "full" / "checkpoints" / "step_00000008").exists()
    monkeypatch.setattr(module, name, real)
    assert main(_train_args(tmp_path, train_shards, "full", **{"checkpoint.every": 4})) == 0


class _FullDiskFile:
    """A metrics.jsonl whose disk fills after `room` records."""

    def __init__(self, room):
        self.room = room

    def write(self, text):
        self.room -= 1
        if self.room < 0:
            raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def close(self):
        raise OSError(28, "No space left on device")


def test_full_disk_while_appending_metrics_saves_and_stops(tmp_path, train_shards, capsys, monkeypatch):
    from mtllm_train.metrics import MetricsLogger

    real_init = MetricsLogger.__init__

    def filling(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.file = _FullDiskFile(room=4)

    monkeypatch.setattr(MetricsLogger, "__init__", filling)
    args = _train_args(tmp_path, train_shards, "meter", **{"checkpoint.every": 8})
    code, err = _run(capsys, *args)
    assert code == 1 and len(err) == 1, err
    assert re.search(r"step 5: cannot write \S+/meter/metrics\.jsonl \(No space left on device\); saved a checkpoint "
                     r"at step 5: free space, then rerun the same command to resume", err[0]), err
    assert Checkpoints(tmp_path / "meter").steps() == [5]
    monkeypatch.setattr(MetricsLogger, "__init__", real_init)
    assert main(args) == 0 and Checkpoints(tmp_path / "meter").steps()[-1] == 12


def test_full_disk_during_shards_build_keeps_the_complete_shards(tmp_path, capsys, monkeypatch):
    import mtllm_train.data.shard_writer as writer_module

    real, calls = writer_module.sha256_file, {"n": 0}

    def filling(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr(writer_module, "sha256_file", filling)
    args = ["shards", "build", "--input", "shards/sample/enwiki_sample.jsonl", "--out", tmp_path / "out",
            "--llm-tokenizer", "configs/tiny/llm_tokenizer", "--mt-tokenizer", "configs/tiny/mt_tokenizer",
            "--max-length", "32", "--shard-size", "50"]
    code, err = _run(capsys, *args)
    assert code == 2 and len(err) == 1 and "No space left on device; the complete shards are kept: a rerun of the " \
        "same command finishes the build" in err[0], err
    monkeypatch.setattr(writer_module, "sha256_file", real)
    assert main([str(a) for a in args]) == 0 and (tmp_path / "out" / "manifest.json").is_file()


def test_full_disk_during_export_leaves_nothing(tmp_path, train_shards, capsys, monkeypatch):
    import mtllm_train.export as export_module

    assert main(_train_args(tmp_path, train_shards, "exp", **{"train.steps": 4})) == 0

    def full(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(export_module, "save_file", full)
    code, err = _run(capsys, "export", "--run", tmp_path / "exp", "--out", tmp_path / "out")
    assert code == 2 and len(err) == 1 and "projection.safetensors: No space left on device; nothing was left at " \
        "--out" in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, train_shards, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    code, err = _run(capsys, "train", "--config", "configs/tiny.yaml",
                     *train_overrides(tmp_path / "a_file" / "runs", train_shards, **{"run.name": "x"}))
    assert code == 2 and len(err) == 1 and "cannot create it (Not a directory); give run.dir a folder this job can " \
        "write" in err[0], err


def test_a_crafted_rank_file_is_refused_and_runs_no_code(tmp_path, train_shards, capsys):
    run = tmp_path / "rk"
    args = _train_args(tmp_path, train_shards, "rk", **{"train.steps": 4})
    assert main(args) == 0  # a rerun of the finished run resumes its checkpoint (and trains nothing)
    step = run / "checkpoints" / "step_00000004"
    torch.save({"rng": _Payload(tmp_path / "PWNED")}, step / "rank_0.pt")
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["rank_0.pt"] = sha256_file(step / "rank_0.pt")  # the attacker fixes sums and sizes
    meta["sizes"]["rank_0.pt"] = (step / "rank_0.pt").stat().st_size
    (step / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    code, err = _run(capsys, *args)
    assert code == 2 and len(err) == 1 and "rank_0.pt holds what a checkpoint does not, refused" in err[0], err
    assert not (tmp_path / "PWNED").exists()


def test_a_stage2_run_as_init_from_is_one_line(tmp_path):
    from mtllm_train.config import ConfigError
    from mtllm_train.tasks.models import load_stage1

    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "task.json").write_text(json.dumps({"command": "task-train", "kind": "llm"}))
    with pytest.raises(ConfigError, match=r"task\.init_from: \S+/s2 is a stage-2 run \(task-train of the llm\); give "
                                          r"the stage-1 run folder"):
        load_stage1(None, str(tmp_path / "s2"), 0)


@pytest.mark.parametrize("damage", ["a test file missing", "a bad label in a dev file"])
def test_stage2_files_are_checked_before_the_first_step(tmp_path, capsys, damage):
    from stage2_data import build_sentiment

    data = build_sentiment(tmp_path / "data")
    if damage == "a test file missing":
        (tmp_path / "data" / "test" / "ind.jsonl").unlink()
        expected = r"task file '\S+/test/ind\.jsonl' does not exist$"
    else:
        with (tmp_path / "data" / "dev" / "ind.jsonl").open("a") as dev:
            dev.write(json.dumps({"text": "Filmnya bagus.", "label": "great"}) + "\n")
        expected = r"\S+/dev/ind\.jsonl:25: label 'great' is not one of negative, positive$"
    settings = {"run.dir": tmp_path, "run.name": "s2", "data.micro_batch_size": 8, "train.global_batch_size": 16,
                "task.max_length": 32, "task.epochs": 3, "logging.progress_bar": False, **data}
    code, err = _run(capsys, "task-train", "--config", "configs/tiny.yaml", *(f"{k}={v}" for k, v in settings.items()))
    assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
    assert not (tmp_path / "s2" / "metrics.jsonl").exists()  # found before the first step


def test_a_run_refused_before_its_first_step_leaves_nothing(tmp_path, train_shards, capsys):
    code, err = _run(capsys, *_train_args(tmp_path, tmp_path / "no_shards", "refused"))
    assert code == 2 and len(err) == 1 and "no_shards" in err[0], err
    assert not (tmp_path / "refused").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made is left as it was
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    code, err = _run(capsys, *_train_args(tmp_path, tmp_path / "no_shards", "kept"))
    assert code == 2 and sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".lock", "config.yaml", "notes.txt"]


def test_a_file_system_without_locks_runs_unlocked_with_one_line(tmp_path, train_shards, capsys, monkeypatch):
    import errno

    import mtllm_train.run_folder as run_folder_module

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_folder_module.fcntl, "lockf", no_locks)
    code, err = _run(capsys, *_train_args(tmp_path, train_shards, "nfs", **{"train.steps": 2}))
    assert code == 0 and [line for line in err if "lock" in line] == [
        f"{tmp_path / 'nfs' / '.lock'}: this file system does not lock files (No locks available); the run goes on "
        f"unlocked: keep one trainer per run.name"], err


# The table of fault cases: (test, what goes wrong, what must happen).
FAULTS = [
    ("test_ctrl_c_checkpoints_and_a_second_one_stops_at_once", "Ctrl-C (SIGINT to the process group, 2 loader "
     "workers), once and twice", "once: one line, a checkpoint at the step's end, exit 0, nothing lost; twice: "
     "stops at once with one line, exit 130, no traceback"),
    ("test_unreadable_shard_stops_at_once", "a shard unreadable mid-tar, data.num_workers 0 / 1 / 2",
     "exit 2 in seconds, one line naming shard and sample; no worker left behind"),
    ("test_one_rank_with_bad_data_stops_both", "one of 2 ranks (torchrun, ddp) reads a broken shard",
     "both ranks stop within seconds (the step's all-reduce carries the failure), non-zero exit"),
    ("test_damaged_shard_is_refused", "a flipped byte in token data, a truncated shard, a missing shard",
     "exit 2 before training on it: checksum mismatch / missing, naming the shard"),
    ("test_skip_bad_samples_counts_every_dropped_sample", "data.skip_bad_samples with a truncated shard",
     "the run goes on; bad_samples counts all 10 samples of the shard per pass"),
    ("test_manifest_sample_count_is_checked_against_the_shard", "manifest claims 11 samples for a 10-sample shard",
     "exit 2 naming the shard and both counts"),
    ("test_crafted_checkpoint_metadata_runs_no_code", "a .metadata pickle that calls exec (checksums forged)",
     "resume and export refuse it in one line; the code never runs"),
    ("test_second_trainer_on_a_run_folder_is_refused", "a second trainer on a run folder in use",
     "exit 2 naming host and pid of the holder; the first trainer is undisturbed"),
    ("test_a_trainer_killed_outright_frees_its_run_folder_at_once", "kill -9 of a trainer with 2 loader workers",
     "the run folder is free at once (a record lock, not inherited by workers); the workers end with it"),
    ("test_ranks_stop_with_their_launcher", "the torchrun agent killed outright, 2 ranks training",
     "both ranks save a checkpoint at the step's end and exit; none trains on unattended"),
    ("test_resume_reads_the_settings_its_checkpoints_record", "config.yaml deleted, then edited (LoRA rank)",
     "a changed lr is still refused in one line; export rebuilds the model the checkpoints hold"),
    ("test_a_tar_member_declaring_gigabytes_is_refused_before_it_is_read", "a shard member header declaring 3 GB "
     "(checksum restamped)", "exit 2 in one line naming the member's size, before reading it"),
    ("test_a_checkpoint_listing_a_huge_file_is_refused_without_hashing_it", "meta.json lists a 64 GiB sparse file",
     "export refuses in one line within seconds (sizes bounded by the model's trainable weights)"),
    ("test_config_parsing_is_bounded", "a YAML alias, non-UTF-8 bytes, a 1 MiB config file",
     "exit 2 in one line each"),
    ("test_full_disk_while_appending_metrics_saves_and_stops", "disk full while appending metrics.jsonl between "
     "checkpoints", "every rank saves a checkpoint at that step's end; one line, exit 1; a rerun resumes"),
    ("test_full_disk_during_shards_build_keeps_the_complete_shards", "disk full while `shards build` writes",
     "one line naming the file, exit 2; complete shards kept; a rerun finishes the build"),
    ("test_full_disk_during_export_leaves_nothing", "disk full while an export is written",
     "one line naming the file, exit 2; nothing at --out, no partial folder beside it"),
    ("test_a_run_dir_that_cannot_be_written_is_one_line", "run.dir not writable (a file where a folder must be)",
     "one line, exit 2, on every rank before anything is loaded"),
    ("test_a_crafted_rank_file_is_refused_and_runs_no_code", "a rank_0.pt pickle that calls exec (sums and sizes "
     "forged)", "resume refuses it in one line (every rank), the code never runs"),
    ("test_a_stage2_run_as_init_from_is_one_line", "task.init_from names a stage-2 run",
     "one line naming it, before any weights are read"),
    ("test_stage2_files_are_checked_before_the_first_step", "a stage-2 test file missing, a bad label in a dev "
     "file (one target language)", "one line naming file (and line) before the first step, not at validation"),
    ("test_a_run_refused_before_its_first_step_leaves_nothing", "a new run refused during its set-up (no shards "
     "there)", "one line; the run folder it had created is gone (a folder that existed is left as it was)"),
    ("test_a_file_system_without_locks_runs_unlocked_with_one_line", "the run folder's file system has no locks "
     "(Lustre without flock)", "one line says so; the run goes on unlocked"),
    ("test_resume_with_other_settings_is_refused", "resume with model.lora.r / optim.lr / train.steps changed",
     "exit 2 naming key and both values; config.yaml untouched; the run still exports"),
    ("test_resume_may_change_how_it_logs_and_checkpoints", "resume with logging / checkpoint / timeout changed",
     "accepted and recorded in config.yaml"),
    ("test_non_finite_weights_are_never_saved", "an update makes a weight inf",
     "exit 1 at the next checkpoint step, nothing saved; earlier checkpoints finite"),
    ("test_export_refuses_a_checkpoint_with_non_finite_weights", "export of a checkpoint holding NaN",
     "exit 2 naming the checkpoint and the steps available"),
    ("test_deepspeed_says_a_non_finite_step_was_applied_and_saves_nothing", "inf gradient under DeepSpeed",
     "exit 1 saying DeepSpeed applied the step; no checkpoint from it"),
    ("test_damaged_newest_checkpoint_falls_back", "newest checkpoint truncated / empty meta.json / a flipped bit",
     "reported; the one before it resumed; the end result bit-identical"),
    ("test_metrics_after_a_crash_hold_every_step_once", "crash after the last checkpoint, a half-written line",
     "metrics.jsonl holds each step once after resume"),
    ("test_full_disk_during_a_checkpoint_keeps_the_earlier_ones", "disk full while writing a checkpoint (rank file, "
     "sharded state, meta.json)", "exit 2 in one line; no partial checkpoint; earlier ones intact; a rerun resumes"),
    ("test_a_users_copy_of_a_step_folder_is_neither_a_checkpoint_nor_deleted", "a step_00000008.bak copy in the "
     "checkpoint folder", "ignored by resume and export, not deleted by pruning"),
    ("test_every_checkpoint_damaged_stops_every_rank_with_the_same_line", "every checkpoint damaged, 2 ranks",
     "both ranks stop with the same one line, no traceback"),
    ("test_a_save_after_going_back_past_damaged_checkpoints_keeps_the_sound_ones",
     "the two newest checkpoints damaged, keep_last 2, a preemption just after resuming from an older one",
     "the damaged later ones are removed, the one just saved and the sound one kept; the run ends bit-identical"),
]


# --- 10. Ctrl-C ------------------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(tmp_path, train_shards, monkeypatch, capsys):
    """As a terminal sends it: SIGINT to the trainer's whole process group (its loader workers too)."""
    import os
    import signal

    def start(name):
        process = subprocess.Popen([sys.executable, "-m", "mtllm_train", *map(str, _train_args(
            tmp_path, train_shards, name, **{"train.steps": 400, "checkpoint.every": 200, "data.num_workers": 2}))],
            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        metrics, deadline = tmp_path / name / "metrics.jsonl", time.time() + 60
        while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:  # in the loop
            time.sleep(0.05)
        return process

    once = start("once")
    os.killpg(once.pid, signal.SIGINT)
    out, err = once.communicate(timeout=120)
    assert once.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "Ctrl-C: the run saves a checkpoint at the end of this step" in err and "preempted: saved step" in out + err
    saved = Checkpoints(tmp_path / "once").steps()
    assert len(saved) == 1 and saved[0] == len(read_metrics(tmp_path / "once"))  # nothing lost
    # Twice (in this process: two signals sent back to back can arrive as one): the second press interrupts, and
    # the CLI says so in one line.
    with loop_module.Preemption(tmp_path / "STOP", is_main=True) as preemption:
        preemption._request(signal.SIGINT, None)
        assert preemption.requested
        with pytest.raises(KeyboardInterrupt):
            preemption._request(signal.SIGINT, None)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert "Ctrl-C: the run saves a checkpoint" in capsys.readouterr().err  # the first press, said once
    code, err = _run(capsys, *_train_args(tmp_path, train_shards, "twice"))
    assert code == 130 and len(err) == 1 and err[0].startswith("mtllm: interrupted; a training run resumes from")


def fault_rows() -> list[str]:
    """The table as the README shows it (section "When things go wrong")."""
    return ["| what goes wrong | what happens |", "|---|---|",
            *(f"| {what} | {outcome} |" for _, what, outcome in FAULTS)]


def test_the_table_lists_every_fault_case_and_the_readme_shows_it():
    cases = sorted(name for name in globals() if name.startswith("test_") and "the_table" not in name)
    assert sorted(name for name, _, _ in FAULTS) == cases
    section = (ROOT / "README.md").read_text().split("### When things go wrong", 1)[1].split("\n#", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("|")] == fault_rows()

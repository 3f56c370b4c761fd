"""`data.shards` as an http(s) URL or a `pipe:` command (mtllm_train/data/locations.py): the same batches as the
local folder, the same exact resume, the checksum checked as a shard streams, and every failure one clear line,
never a hang. The server is http.server on 127.0.0.1, started here; nothing else is reached."""

import functools
import shutil
import socket
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import mtllm_train.data.locations as locations
from conftest import read_metrics, train_overrides
from mtllm_train.__main__ import main
from mtllm_train.config import ConfigError
from mtllm_train.data.inspect_shards import inspect_shards
from mtllm_train.data.reader import BatchReader
from mtllm_train.data.tar_reader import ShardError

SHARD = "shard-000003.tar"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(folder it serves, its URL): each test serves its own copy of the shards from a subfolder."""
    root = tmp_path_factory.mktemp("served")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _served(server, train_shards, name):
    """A copy of the 16 x 10 training shards in the server's folder: (its path, its URL)."""
    root, url = server
    shutil.copytree(train_shards, root / name)
    return root / name, f"{url}/{name}"


def _reader(location, **settings):
    return BatchReader(str(location), **{"batch_size": 4, "group_batches": 4, "seed": 1, **settings})


def _read(reader, n):
    iterator = iter(reader)
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        reader.close()


def _same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and [a["keys"] for a in batches_a] == [b["keys"] for b in batches_b] and all(
        torch.equal(a[k], b[k]) for a, b in zip(batches_a, batches_b)
        for k in ("mt_input_ids", "mt_attention_mask", "llm_input_ids", "llm_attention_mask"))


def _entry(reader, name=SHARD):
    return next(shard for shard in reader.shards if shard["name"] == name)


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the same batches, the same resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, workers", [("http", 2), ("pipe", 1)])
def test_remote_batches_equal_local_and_resume_exactly(server, train_shards, kind, workers):
    folder, url = _served(server, train_shards, f"same-{kind}")
    location = url if kind == "http" else f"pipe:cat {folder}/{{}}"
    local = _read(_reader(folder, num_workers=workers), 45)  # 40 batches an epoch: into the second
    assert _same(_read(_reader(location, num_workers=workers), 45), local)
    interrupted = _reader(location, num_workers=workers)
    _read(interrupted, 13)  # mid-epoch, mid-shard
    restored = _reader(location, num_workers=workers)
    restored.load_state_dict(interrupted.state_dict())
    assert _same(_read(restored, 10), local[13:23])


def test_two_ranks_read_each_shard_once_over_http(server, train_shards):
    folder, url = _served(server, train_shards, "ranks")
    per_rank = []
    for rank in range(2):
        remote = _read(_reader(url, rank=rank, world_size=2, num_workers=2), 20)
        assert _same(remote, _read(_reader(folder, rank=rank, world_size=2, num_workers=2), 20))
        per_rank.append([key for batch in remote for key in batch["keys"]])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:010d}" for i in range(160)]
    assert inspect_shards(url) == 0  # `mtllm shards inspect URL` streams and checks every shard


# --- the checksum, checked as the shard streams ---------------------------------------------------------------------

def test_corrupt_served_shard_fails_its_checksum_before_its_last_sample(server, train_shards):
    folder, url = _served(server, train_shards, "corrupt")
    with tarfile.open(folder / SHARD) as tar:  # the last byte of the first llm.npy: a token id, the tar still reads
        member = next(m for m in tar.getmembers() if m.name.endswith(".llm.npy"))
    data = bytearray((folder / SHARD).read_bytes())
    data[member.offset_data + member.size - 1] ^= 0x01
    (folder / SHARD).write_bytes(bytes(data))
    reader = _reader(url, num_workers=0)
    seen = []
    message = rf"^shard {url}/{SHARD}: checksum mismatch \(sha256 [0-9a-f]{{12}}\.\.\. of the \d+ bytes streamed"
    with pytest.raises(ShardError, match=message):
        for sample in reader.shard_samples(_entry(reader)):
            seen.append(sample)
    assert len(seen) == _entry(reader)["samples"] - 1  # the last sample is held back until the stream checks out
    assert inspect_shards(url) == 1
    with pytest.raises(ShardError, match=message):  # through the batches, from a worker
        _read(_reader(url, num_workers=1), 40)
    # With skip_bad_samples the held-back sample is dropped and counted; the run goes on.
    batches = _read(_reader(url, num_workers=0, skip_bad_samples=True), 40)
    assert sum(batch["bad_samples"] for batch in batches) >= 1


def _for_shards(folder, command):
    """A pipe: template that runs `command` for the shards and plain cat for the manifest."""
    return f"pipe:case {{}} in *.tar) {command};; *) cat {folder}/{{}};; esac"


def test_truncated_stream_is_refused(train_shards):
    reader = _reader(_for_shards(train_shards, f"head -c 3000 {train_shards}/{{}}"), num_workers=0)
    with pytest.raises(ShardError, match=rf"^shard pipe:case {SHARD} in .*: (unreadable at sample|checksum mismatch)"):
        list(reader.shard_samples(_entry(reader)))


# --- failures: one line naming the location and the cause, never a hang -------------------------------------------

def test_http_errors_are_one_clear_line(server, train_shards):
    folder, url = _served(server, train_shards, "missing")
    (folder / SHARD).unlink()
    reader = _reader(url, num_workers=0)
    with pytest.raises(ShardError, match=rf"^shard {url}/{SHARD}: cannot be opened \(HTTP error 404 \(File not found\)\)$"):
        list(reader.shard_samples(_entry(reader)))
    with pytest.raises(ShardError, match=rf"shard {url}/{SHARD}: cannot be opened \(HTTP error 404"):
        _read(_reader(url, num_workers=1), 40)
    with pytest.raises(ConfigError, match=rf"^shards '{url}/nowhere': cannot read manifest\.json from {url}/nowhere/"
                                          rf"manifest\.json: HTTP error 404 \(File not found\); build shards"):
        _reader(f"{url}/nowhere")
    port = _closed_port()
    with pytest.raises(ConfigError, match=rf"^shards 'http://127\.0\.0\.1:{port}/s': cannot read manifest\.json from "
                                          rf"http://127\.0\.0\.1:{port}/s/manifest\.json: cannot connect \(Connection refused\)"):
        _reader(f"http://127.0.0.1:{port}/s")


def test_a_server_that_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(locations, "READ_TIMEOUT_S", 1.0)
    with socket.socket() as sock:  # listens, never accepts: the connection opens, no answer ever comes
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot connect \(no answer within 1 s\)"):
            _reader(f"http://127.0.0.1:{sock.getsockname()[1]}/s")
    assert time.monotonic() - start < 10


def test_failing_pipe_is_one_clear_line(train_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"^shards 'pipe:false \{\}': cannot read manifest\.json from "
                                          r"pipe:false manifest\.json: the command failed \(exit status 1\); build"):
        _reader("pipe:false {}")
    folder = tmp_path / "shards"
    shutil.copytree(train_shards, folder)
    (folder / SHARD).unlink()
    reader = _reader(f"pipe:cat {folder}/{{}}", num_workers=0)
    with pytest.raises(ShardError, match=rf"^shard pipe:cat {folder}/{SHARD}: unreadable at its start: the command "
                                         rf"failed \(exit status 1: cat: .*{SHARD}: No such file or directory\)$"):
        list(reader.shard_samples(_entry(reader)))
    with pytest.raises(ConfigError, match=r"a pipe: location needs \{\} where the file name goes"):
        _reader(f"pipe:cat {folder}/manifest.json")


def test_a_pipe_that_sends_nothing_times_out_and_is_stopped(monkeypatch, tmp_path):
    monkeypatch.setattr(locations, "READ_TIMEOUT_S", 0.5)
    marker = tmp_path / "finished"
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"the command sent no bytes for 0\.5 s; stopped it"):
        _reader(f"pipe:sleep 2; touch {marker}; cat {{}}")
    assert time.monotonic() - start < 2
    time.sleep(2)
    assert not marker.exists()  # the whole command was killed, not left running


def test_reading_a_shard_part_way_stops_its_command(train_shards, tmp_path):
    marker = tmp_path / "finished"
    reader = _reader(_for_shards(train_shards, f"cat {train_shards}/{{}}; sleep 1; touch {marker}"), num_workers=0)
    samples = reader.shard_samples(_entry(reader))
    next(samples)
    samples.close()
    time.sleep(1.5)
    assert not marker.exists()


# --- end to end: `mtllm train` from the URL --------------------------------------------------------------------------

def _train(tmp_path, shards, name, capsys):
    code = main(["train", "--config", "configs/tiny.yaml",
                 *train_overrides(tmp_path, shards, **{"run.name": name, "train.steps": 3, "checkpoint.every": 3})])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_training_from_http_equals_training_from_the_folder(server, train_shards, tmp_path, capsys):
    folder, url = _served(server, train_shards, "train")
    for name, shards in (("local", folder), ("http", url)):
        code, err = _train(tmp_path, shards, name, capsys)
        assert code == 0, err
    losses = {name: [record["loss"] for record in read_metrics(tmp_path / name)] for name in ("local", "http")}
    assert len(losses["http"]) == 3 and losses["http"] == losses["local"]
    # A shard gone from the server stops the run with one line naming it.
    for shard in folder.glob("*.tar"):
        shard.unlink()
    code, err = _train(tmp_path, url, "gone", capsys)
    assert code == 2 and len(err) == 1 and f"{url}/shard-0000" in err[0] and "HTTP error 404" in err[0], err

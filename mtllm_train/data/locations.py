"""Where a shard folder lives (`data.shards`), and how its files are opened: the one place that knows.

A location is one of
- a local folder: `shards/build/fineweb` (files are `FOLDER/<name>`);
- an http(s) URL prefix, the folder's URL: `https://host/shards/fineweb` (files are `PREFIX/<name>`);
- a `pipe:` command template whose `{}` stands for the file name and whose stdout is the file:
  `pipe:aws s3 cp s3://bucket/shards/{} -`, `pipe:cat /data/shards/{}`.

Remote files (http(s), `pipe:`) are streamed, never downloaded whole: `open_stream` gives a non-seekable
byte stream that counts and hashes what it hands out, so the reader can check a shard's sha256 when its stream
ends. Every failure (an HTTP error, a connection refused or lost, a command exiting non-zero, no bytes for
READ_TIMEOUT_S seconds) raises LocationError, one line naming the file and the cause; none hangs.

Why not webdataset.gopen (a dependency): it opens http(s) with `curl -s --retry 30` and no stall limit, so a
stalled server hangs a reader and an error's cause is only curl's exit code; its `Pipe` waits up to 2 hours
on close and cannot stop a command mid-stream. Here: urllib (no curl needed) and a subprocess read with a
timeout, the command's last stderr line in the message, and the command killed when a reader stops early.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import shlex
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mtllm_train.config import ConfigError

# Seconds a remote read may wait for its next bytes (and a connection for its answer) before it fails.
READ_TIMEOUT_S = 120.0
_REMOTE_PREFIXES = ("http://", "https://", "pipe:")
_BLOCK = 1 << 20


class LocationError(ConfigError):
    """A file of a shard location could not be opened or read; str() is '<where>: <cause>'."""

    def __init__(self, where: str, cause: str):
        super().__init__(f"{where}: {cause}")
        self.where, self.cause = where, cause


def is_remote(location: str | Path) -> bool:
    """An http(s):// URL prefix or a `pipe:` command, rather than a local folder."""
    return isinstance(location, str) and location.startswith(_REMOTE_PREFIXES)


def check(location: str | Path) -> None:
    """Refuse a malformed location (ConfigError naming it)."""
    if isinstance(location, str) and location.startswith("pipe:") and "{}" not in location:
        raise ConfigError(f"shards {location!r}: a pipe: location needs {{}} where the file name goes, e.g. "
                          f"'pipe:aws s3 cp s3://bucket/shards/{{}} -'")
    if is_remote(location) and not str(location).startswith("pipe:") and not urllib.parse.urlsplit(location).netloc:
        raise ConfigError(f"shards {location!r}: no host in the URL; expected http(s)://HOST/PATH of the shard folder")


def join(location: str | Path, name: str) -> str | Path:
    """The file `name` of `location`: a Path for a local folder, the URL or the command (a string) otherwise.
    The same string names the file in messages."""
    check(location)
    if not is_remote(location):
        return Path(location) / name
    if location.startswith("pipe:"):
        return location.replace("{}", shlex.quote(name))  # names come from a manifest: never shell syntax
    return f"{location.rstrip('/')}/{urllib.parse.quote(name)}"


def describe(location: str | Path, name: str | None = None) -> str:
    """How messages name a location, or one of its files."""
    return str(location if name is None else join(location, name))


def open_stream(location: str | Path, name: str) -> HashingStream:
    """File `name` of `location` as a byte stream (read, close) that hashes what it hands out."""
    where = join(location, name)
    if not is_remote(location):
        try:
            return HashingStream(open(where, "rb"), str(where))
        except OSError as err:
            raise LocationError(str(where), err.strerror or str(err)) from None
    if where.startswith("pipe:"):
        return HashingStream(_PipeStream(where), where)
    return HashingStream(_HttpStream(where), where)


def read_bytes(location: str | Path, name: str) -> bytes:
    """The whole of file `name` of `location` (for small files: the manifest)."""
    with open_stream(location, name) as stream:
        return stream.read_all()


class HashingStream:
    """A read-only stream over a raw one, with the sha256 and size of every byte read so far."""

    def __init__(self, raw, where: str):
        self.raw, self.where, self.size, self._digest = raw, where, 0, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.read_all()
        data = self.raw.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def read_all(self) -> bytes:
        return b"".join(iter(lambda: self.read(_BLOCK), b""))

    def finish(self) -> str:
        """Read to the end (what a tar reader leaves after the end-of-archive blocks) and return the sha256."""
        while self.read(_BLOCK):
            pass
        return self._digest.hexdigest()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> HashingStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HttpStream:
    def __init__(self, url: str):
        self.url, self.read_bytes = url, 0
        try:
            self.response = urllib.request.urlopen(url, timeout=READ_TIMEOUT_S)  # follows redirects
        except urllib.error.HTTPError as err:
            err.close()
            raise LocationError(url, f"HTTP error {err.code} ({err.reason})") from None
        except urllib.error.URLError as err:
            reason = err.reason
            raise LocationError(url, f"cannot connect ({_cause(reason) if isinstance(reason, BaseException) else reason})") from None
        except (OSError, http.client.HTTPException) as err:  # a timeout, a reset, a malformed answer
            raise LocationError(url, f"cannot connect ({_cause(err)})") from None

    def read(self, size: int) -> bytes:
        try:
            data = self.response.read(size)
        except (OSError, http.client.HTTPException) as err:  # TimeoutError is an OSError; IncompleteRead not
            raise LocationError(self.url, f"the connection failed after {self.read_bytes} bytes ({_cause(err)})") from None
        self.read_bytes += len(data)
        return data

    def close(self) -> None:
        self.response.close()


class _PipeStream:
    """The stdout of `sh -c COMMAND`: EOF with a non-zero exit, or no bytes for READ_TIMEOUT_S, raises
    LocationError (with the command's last stderr line); close() before EOF kills the command's process group."""

    def __init__(self, where: str):
        self.where, self.command = where, where[len("pipe:"):]
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.stderr, start_new_session=True)
        except OSError as err:
            self.stderr.close()
            raise LocationError(where, f"cannot start the command ({_cause(err)})") from None
        self.fd, self.done = self.proc.stdout.fileno(), False

    def read(self, size: int) -> bytes:
        if self.done:
            return b""
        ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT_S)
        if not ready:
            self.close()
            raise LocationError(self.where, f"the command sent no bytes for {READ_TIMEOUT_S:g} s; stopped it")
        data = os.read(self.fd, size)
        if not data:
            self._finish()
        return data

    def _finish(self) -> None:
        """At EOF: the command must exit 0 (within READ_TIMEOUT_S)."""
        self.done = True
        try:
            status = self.proc.wait(READ_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
            raise LocationError(self.where, f"the command closed its output but did not exit within "
                                            f"{READ_TIMEOUT_S:g} s; stopped it") from None
        if status != 0:
            exit_text = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            last = self._last_stderr_line()
            raise LocationError(self.where, f"the command failed ({exit_text}{': ' + last if last else ''})")

    def _last_stderr_line(self) -> str:
        try:
            self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in self.stderr.read().decode("utf-8", "replace").splitlines()]
        except OSError:
            return ""
        lines = [line for line in lines if line]
        return lines[-1][:300] if lines else ""

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and what it started (a pipeline)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()

    def close(self) -> None:
        """Stop reading: a command still running (a reader that stops mid-file) is killed, not waited for."""
        self._kill()
        self.proc.stdout.close()
        self.stderr.close()
        self.done = True


def _cause(err: BaseException) -> str:
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return f"no answer within {READ_TIMEOUT_S:g} s"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__

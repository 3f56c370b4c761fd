"""Helpers shared by test modules: child processes and 2-rank torchrun launches."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_pids(parent: int) -> list[int]:
    """Process ids whose parent is `parent` (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (run-<id>.wandb: a 7-byte header, then LevelDB-style log blocks of
    32 KiB whose fragments carry protobuf `Record`s), to check what a run sent without a server."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a fragment header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last fragment
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))}


def torchrun(*cli_args, entry=("-m", "mtllm_train")):
    """Start `mtllm <cli_args>` on 2 ranks under torchrun (`entry`: another script that runs it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *entry, *cli_args]
    return subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output

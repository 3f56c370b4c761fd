"""The shard folder's manifest.json: what was built, with which tokenizers, and a checksum per shard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        hint = " (the build is unfinished: run the same `mtllm shards build` again)" if (
            Path(shards_dir) / ".build").is_dir() else ""
        raise ConfigError(f"shards {str(shards_dir)!r}: no {MANIFEST}{hint}; build shards with `mtllm shards build`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"shards {str(shards_dir)!r}: format version {manifest.get('format_version')}, "
                          f"this mtllm-train reads version {FORMAT_VERSION}; rebuild the shards")
    return manifest


def check_tokenizers(manifest: dict, shards_dir: str | Path, llm: tuple[str, str], mt: tuple[str, str]) -> None:
    """Refuse shards built with other tokenizers: (name, fingerprint) of the run's LLM and MT tokenizers."""
    for view, (name, fp) in (("llm", llm), ("mt", mt)):
        built = manifest["tokenizers"][view]
        if built["fingerprint"] != fp:
            raise ConfigError(f"shards {str(shards_dir)!r} were tokenized for the {view.upper()} view with "
                              f"{built['name']!r} (fingerprint {built['fingerprint']}), but the run uses {name!r} "
                              f"(fingerprint {fp}); rebuild the shards with the run's tokenizers")

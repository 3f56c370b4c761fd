"""The shard folder's manifest.json: what was built, with which tokenizers, and a checksum per shard."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Every field the readers of a shard folder look up, with its JSON type: checked when the manifest is loaded,
# so a corrupt or hand-edited one is refused by name instead of failing with a KeyError in training.
_VIEW_FIELDS = {"name": (str,), "fingerprint": (str,), "pad_id": (int,)}
_REQUIRED_FIELDS = {
    "max_length": (int,), "mt_lang": (str, type(None)), "shards": (list,),
    **{f"totals.{key}": (int,) for key in ("samples", "llm_tokens", "mt_tokens", "empty_dropped", "truncated")},
    **{f"tokenizers.{view}.{key}": types for view in ("llm", "mt") for key, types in _VIEW_FIELDS.items()},
}
_SHARD_FIELDS = {"name": (str,), "samples": (int,), "sha256": (str,)}
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", type(None): "null"}
_MISSING = object()


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        hint = " (the build is unfinished: run the same `mtllm shards build` again)" if (
            Path(shards_dir) / ".build").is_dir() else ""
        raise ConfigError(f"shards {str(shards_dir)!r}: no {MANIFEST}{hint}; build shards with `mtllm shards build`")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
        raise ConfigError(f"{path}: not valid JSON ({err}); rebuild the shards") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(manifest).__name__}; rebuild the shards")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"shards {str(shards_dir)!r}: format version {manifest.get('format_version')}, "
                          f"this mtllm-train reads version {FORMAT_VERSION}; rebuild the shards")
    _check_fields(manifest, path)
    return manifest


def _lookup(data: dict, dotted: str) -> object:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _check_field(path: Path, key: str, value: object, types: tuple) -> None:
    expected = " or ".join(_TYPE_NAMES[t] for t in types)
    if value is _MISSING:
        raise ConfigError(f"{path}: '{key}' is missing (expected {expected}); rebuild the shards")
    # JSON true/false load as bool, which isinstance() counts as an int.
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(f"{path}: '{key}' must be {expected}, got {reprlib.repr(value)}; rebuild the shards")


def _check_fields(manifest: dict, path: Path) -> None:
    for key, types in _REQUIRED_FIELDS.items():
        _check_field(path, key, _lookup(manifest, key), types)
    for index, shard in enumerate(manifest["shards"]):
        where = f"shards[{index}]"
        if not isinstance(shard, dict):
            raise ConfigError(f"{path}: '{where}' must be an object with {', '.join(_SHARD_FIELDS)}, "
                              f"got {reprlib.repr(shard)}")
        for key, types in _SHARD_FIELDS.items():
            _check_field(path, f"{where}.{key}", shard.get(key, _MISSING), types)
        # Readers open shards_dir / name: a path (a/b, ../x, /x) would read a file outside the shard folder.
        if Path(shard["name"]).name != shard["name"] or shard["name"] in ("", ".."):
            raise ConfigError(f"{path}: '{where}.name' must be a file name in the shard folder, "
                              f"got {shard['name']!r}")
    counted = sum(shard["samples"] for shard in manifest["shards"])
    if manifest["totals"]["samples"] != counted:
        raise ConfigError(f"{path}: 'totals.samples' is {manifest['totals']['samples']}, but the shards' samples add "
                          f"up to {counted}; the manifest was edited or is corrupt, rebuild the shards")


def check_tokenizers(manifest: dict, shards_dir: str | Path, llm: tuple[str, str], mt: tuple[str, str]) -> None:
    """Refuse shards built with other tokenizers: (name, fingerprint) of the run's LLM and MT tokenizers."""
    for view, (name, fp) in (("llm", llm), ("mt", mt)):
        built = manifest["tokenizers"][view]
        if built["fingerprint"] != fp:
            raise ConfigError(f"shards {str(shards_dir)!r} were tokenized for the {view.upper()} view with "
                              f"{built['name']!r} (fingerprint {built['fingerprint']}), but the run uses {name!r} "
                              f"(fingerprint {fp}); rebuild the shards with the run's tokenizers")

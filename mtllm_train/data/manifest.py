"""The shard folder's manifest.json: what was built, with which tokenizers, and a checksum per shard."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.data import locations
from mtllm_train.files import write_atomic

# 2: each sample also holds both views' word-span indices (llm_words.npy, mt_words.npy; manifest "word_spans").
# Version 1 folders (ids only) are still read, for sequence-only runs.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# Every field the readers of a shard folder look up, with its JSON type: checked when the manifest is loaded,
# so a corrupt or hand-edited one is refused by name instead of failing with a KeyError in training.
_VIEW_FIELDS = {"name": (str,), "fingerprint": (str,), "pad_id": (int,)}
_REQUIRED_FIELDS = {
    "max_length": (int,), "mt_lang": (str, type(None)), "shards": (list,),
    **{f"totals.{key}": (int,) for key in ("samples", "llm_tokens", "mt_tokens", "empty_dropped", "truncated")},
    **{f"tokenizers.{view}.{key}": types for view in ("llm", "mt") for key, types in _VIEW_FIELDS.items()},
}
_VERSION_FIELDS = {1: {}, 2: {"word_spans": (bool,)}}  # required from that format version on
_SHARD_FIELDS = {"name": (str,), "samples": (int,), "sha256": (str,)}
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", bool: "true or false", type(None): "null"}
_MISSING = object()


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def load_manifest(shards_dir: str | Path) -> dict:
    path = locations.join(shards_dir, MANIFEST)  # a Path, or for a URL / pipe: location the string to open
    if locations.is_remote(shards_dir):
        try:
            data = locations.read_bytes(shards_dir, MANIFEST)
        except locations.LocationError as err:
            raise ConfigError(f"shards {str(shards_dir)!r}: cannot read {MANIFEST} from {err.where}: {err.cause}; "
                              f"build shards with `mtllm shards build` and put the folder there") from None
    elif not path.is_file():
        hint = " (the build is unfinished: run the same `mtllm shards build` again)" if (
            Path(shards_dir) / ".build").is_dir() else ""
        raise ConfigError(f"shards {str(shards_dir)!r}: no {MANIFEST}{hint}; build shards with `mtllm shards build`")
    else:
        data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are no text
        raise ConfigError(f"{path}: not valid JSON ({err}); rebuild the shards") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(manifest).__name__}; rebuild the shards")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ConfigError(f"shards {str(shards_dir)!r}: format version {version}, this mtllm-train reads versions "
                          f"{' and '.join(map(str, READABLE_VERSIONS))}; rebuild the shards")
    _check_fields(manifest, path)
    if version == 1:
        manifest["word_spans"] = False  # built before shards held word spans
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
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ConfigError(f"{path}: '{key}' must be {expected}, got {reprlib.repr(value)}; rebuild the shards")


def _check_fields(manifest: dict, path: Path) -> None:
    required = {**_REQUIRED_FIELDS, **{key: types for version, fields in _VERSION_FIELDS.items()
                                       if version <= manifest["format_version"] for key, types in fields.items()}}
    for key, types in required.items():
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


def has_word_spans(manifest: dict) -> bool:
    """Whether the shards hold word-span indices (batches then carry llm_word_ids and mt_word_ids)."""
    return manifest["word_spans"]


def require_word_spans(manifest: dict, shards_dir: str | Path, needed_by: str = "loss.span_weight > 0") -> None:
    """Refuse shards without word spans, for a run that needs them (`needed_by` says what needs them)."""
    if has_word_spans(manifest):
        return
    sources = [str(source.get("path")) for source in manifest.get("sources", []) if isinstance(source, dict)]
    inputs = " ".join(sources) if 0 < len(sources) <= 3 else "DOCUMENTS"
    llm, mt = manifest["tokenizers"]["llm"]["name"], manifest["tokenizers"]["mt"]["name"]
    lang = f" --mt-lang {manifest['mt_lang']}" if manifest["mt_lang"] else ""
    raise ConfigError(f"shards {str(shards_dir)!r} were built without word spans (format version "
                      f"{manifest['format_version']}), which {needed_by} needs; rebuild them into a new folder with "
                      f"this version: mtllm shards build --input {inputs} --out NEW_FOLDER --llm-tokenizer {llm} "
                      f"--mt-tokenizer {mt}{lang} --max-length {manifest['max_length']}")

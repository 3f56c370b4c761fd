"""Reading a model or tokenizer from a folder or the hub, with one line naming the config key when it is not there.
Light on purpose (transformers' loaders only): the commands that read tokenizers alone (shards, preflight) do not
import peft and bitsandbytes through it."""

from __future__ import annotations

from pathlib import Path

from mtllm_train.config import ConfigError


def _is_local_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).exists()


def from_pretrained(loader, spec: str, key: str, **kwargs):
    """Call `loader.from_pretrained(spec)`, turning "not found" into one line naming the config key."""
    if _is_local_path(spec) and not Path(spec).expanduser().is_dir():
        raise ConfigError(f"{key}: {spec!r} is not a folder (expected a model folder or a hub id)")
    try:
        return loader.from_pretrained(str(Path(spec).expanduser()) if _is_local_path(spec) else spec, **kwargs)
    except (OSError, ValueError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: cannot load {spec!r}: not a local model folder and not in the local "
                          f"Hugging Face cache ({cause})") from None

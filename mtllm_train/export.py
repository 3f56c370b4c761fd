"""`mtllm export`: turn a checkpoint into a self-contained MT-LLM folder, and load one back with one call.

DIR/
    mtllm.json                 how to rebuild the frozen parts: encoder and LLM ids / paths / inline configs,
                               quantization, LoRA settings, pooling; plus the source run and step
    adapter/                   the LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors)
    projection.safetensors     U's weight and bias
    tokenizers/llm, tokenizers/mt

    >>> from mtllm_train.export import load_mtllm
    >>> mtllm = load_mtllm("runs/tiny/export")
    >>> vectors = mtllm.embed(["Ein Satz auf Deutsch."], lang="deu_Latn")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import ConfigError, ModelConfig, from_dict, load_config, to_dict
from mtllm_train.model.stack import MTLLM, build_stack
from mtllm_train.model.tokenizers import ENGLISH, pad_id, pad_right, set_source_language, view_tokenizer

EXPORT_VERSION = 1


def load_trained_stack(run_dir: Path, step: int | None = None) -> tuple[MTLLM, ModelConfig, dict]:
    """The run's stack with the trainable weights of a checkpoint, in this (single) process."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    stack = build_stack(cfg.model)
    meta = Checkpoints(run_dir).load_trainable(stack, step)
    return stack.eval(), cfg.model, meta


def export_run(run: str, out: str, step: int | None = None) -> Path:
    run_dir, out_dir = Path(run), Path(out)
    stack, model_cfg, meta = load_trained_stack(run_dir, step)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    stack.llm.save_pretrained(str(out_dir / "adapter"))
    save_file({"weight": stack.projection.weight.detach().contiguous(), "bias": stack.projection.bias.detach()},
              str(out_dir / "projection.safetensors"))
    model = to_dict(model_cfg)
    for view in ("llm", "mt"):
        view_tokenizer(model_cfg, view).save_pretrained(str(out_dir / "tokenizers" / view))
        model[f"{view}_tokenizer"] = f"tokenizers/{view}"
    manifest = {"format_version": EXPORT_VERSION, "model": model, "run": str(run_dir), "step": meta["step"],
                "backend": meta["backend"]}
    (out_dir / "mtllm.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


class MTLLMEmbedder:
    """A loaded MT-LLM: embed text in any language the MT encoder knows (the student path)."""

    def __init__(self, stack: MTLLM, llm_tokenizer, mt_tokenizer, max_length: int = 512):
        self.stack, self.llm_tokenizer, self.mt_tokenizer = stack, llm_tokenizer, mt_tokenizer
        self.max_length = max_length

    def _tokenize(self, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer.padding_side = "right"
        return pad_right(tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"], pad_id(tokenizer))

    @torch.no_grad()
    def embed(self, texts: list[str], lang: str | None = ENGLISH, batch_size: int = 32) -> torch.Tensor:
        set_source_language(self.mt_tokenizer, lang)
        out = [self.stack.student_pooled(*self._tokenize(self.mt_tokenizer, texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed_teacher(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """The LLM alone (adapters off) on its own tokenization: the stage-1 target for English text."""
        out = [self.stack.teacher_pooled(*self._tokenize(self.llm_tokenizer, texts[i:i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out)


def load_mtllm(path: str | Path) -> MTLLMEmbedder:
    path = Path(path)
    if not (path / "mtllm.json").is_file():
        raise ConfigError(f"{path}: not an exported MT-LLM (no mtllm.json); create one with `mtllm export`")
    manifest = json.loads((path / "mtllm.json").read_text())
    model = dict(manifest["model"])
    for view in ("llm", "mt"):
        model[f"{view}_tokenizer"] = str(path / model[f"{view}_tokenizer"])
    model_cfg = from_dict(ModelConfig, model, "model")
    stack = build_stack(model_cfg)
    set_peft_model_state_dict(stack.llm, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    projection = load_file(str(path / "projection.safetensors"))
    stack.projection.load_state_dict(projection)
    return MTLLMEmbedder(stack.eval(), view_tokenizer(model_cfg, "llm"), view_tokenizer(model_cfg, "mt"))

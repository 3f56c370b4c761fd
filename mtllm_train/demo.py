"""`mtllm demo`: the stack on tiny models, trained on the shipped English sample (CPU, no model hub)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mtllm_train.config import load_config
from mtllm_train.model.loading import load_tokenizer
from mtllm_train.model.loss import fvu, mse
from mtllm_train.model.stack import build_stack, trainable_parameters

SAMPLE = Path("shards/sample/enwiki_sample.jsonl")


def run_demo(workdir: str, steps: int = 40, batch_size: int = 8) -> None:
    cfg = load_config("configs/tiny.yaml")
    stack = build_stack(cfg.model)
    llm_tok = load_tokenizer(cfg.model.llm_tokenizer, "model.llm_tokenizer")
    mt_tok = load_tokenizer(cfg.model.mt_tokenizer, "model.mt_tokenizer")
    mt_tok.src_lang = "eng_Latn"
    llm_tok.pad_token = llm_tok.eos_token
    texts = [json.loads(line)["text"][:300] for line in SAMPLE.open(encoding="utf-8")]
    optimizer = torch.optim.AdamW(trainable_parameters(stack).values(), lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        picked = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=generator)]
        llm = llm_tok(picked, padding=True, truncation=True, max_length=64, return_tensors="pt")
        mt = mt_tok(picked, padding=True, truncation=True, max_length=64, return_tensors="pt")
        student_pooled, teacher_pooled = stack(mt.input_ids, mt.attention_mask, llm.input_ids, llm.attention_mask)
        loss = mse(student_pooled, teacher_pooled)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  fvu {fvu(student_pooled, teacher_pooled):.3f}")
    elapsed = time.perf_counter() - start
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "losses.json").write_text(json.dumps(losses))
    print(f"{steps} steps in {elapsed:.1f}s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; losses in {workdir}/losses.json")

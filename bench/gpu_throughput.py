"""GPU throughput of the stage-1 step at the paper's shapes: an NLLB-600M-shaped encoder under a
Llama-3-8B-shaped bidirectional LLM (random init; bf16, NF4 or FP8 base), sequence length 512.

Sweeps the micro batch (powers of two up to --max-batch, until one does not fit) for one setting of base,
activation checkpointing and compile, and reports per micro batch: step time, tokens/s, MFU and peak memory,
and the paper's stage 1 (10K steps x 256 sequences) projected onto 8xA100 and 8xH100 from the best MFU. Then
the real train.py loop at the best micro batch, same settings, over shards of the bundled sample: its computed
tokens/s as a fraction of the bare step's is the pipeline's own overhead.

    MFU = step FLOPs / step time / peak bf16 FLOP/s, with step FLOPs from mtllm_train.metrics.step_flops:
          2 N_llm T_llm (teacher) + 2 N_enc T_mt (encoder) + 4 N_llm T_mt (student forward + backward
          through the frozen base), T = computed (padded) tokens; attention scores and recompute not counted.

The models are initialised on the GPU (a random-init NF4 base is then quantized there, while loading).

    python bench/gpu_throughput.py --base bf16 --checkpointing none --compile --write   # on an H100/H200
    python bench/gpu_throughput.py --tiny --steps 2                                       # checks on CPU

--write appends the table, with the GPU's name, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mtllm_train.config import (Config, ConfigError, ModelConfig, OptimConfig, checkpointing_policy,  # noqa: E402
                                from_dict, validate)
from mtllm_train.data.shard_writer import build_shards  # noqa: E402
from mtllm_train.distributed import compile_layers  # noqa: E402
from mtllm_train.metrics import PEAK_BF16_FLOPS, parameter_count, peak_flops, read_records, step_flops  # noqa: E402
from mtllm_train.model.loss import squared_error  # noqa: E402
from mtllm_train.model.fp8 import fp8_base  # noqa: E402
from mtllm_train.model.stack import build_stack, trainable_parameters  # noqa: E402
from mtllm_train.optim import build_optimizer  # noqa: E402
from mtllm_train.train import train  # noqa: E402

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0}
NLLB_600M = {"model_type": "m2m_100", "vocab_size": 256206, "d_model": 1024, "encoder_layers": 12,
             "decoder_layers": 1, "encoder_attention_heads": 16, "decoder_attention_heads": 16,
             "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096, "max_position_embeddings": 1024,
             "scale_embedding": True, "pad_token_id": 1}
TINY_LLM = {**LLAMA3_8B, "vocab_size": 2000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_ENCODER = {**NLLB_600M, "vocab_size": 2000, "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4,
                "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "decoder_attention_heads": 4}
PAPER_SAMPLES = 10_000 * 256
PAPER_HOURS = 22


def model_settings(args, device: torch.device) -> dict:
    """The `model` section both measurements use: the paper's shapes (or tiny ones), random init."""
    return {"mt_encoder": TINY_ENCODER if args.tiny else NLLB_600M, "llm": TINY_LLM if args.tiny else LLAMA3_8B,
            "bidirectional": True, "quantization": {"bf16": "none"}.get(args.base, args.base),
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
            "quant_compute_dtype": "bfloat16" if device.type == "cuda" else "float32",
            "activation_checkpointing": args.checkpointing, "pooling": "mean"}


def build(args, device: torch.device):
    model = from_dict(ModelConfig, model_settings(args, device), "model")
    # Random init on the GPU itself (the default device inside): initialising 8B parameters on the CPU takes minutes.
    with torch.device(device):
        stack = build_stack(model, device)
    if args.base == "fp8":
        fp8_base(stack.llm, device)  # as train.py does; refused off FP8 GPUs
    if args.compile:
        compile_layers(stack.llm)
    return stack


def run_steps(stack, optimizer, batch_size: int, seq: int, steps: int, device: torch.device, vocab: tuple[int, int]):
    views = {"mt_input_ids": torch.randint(4, vocab[0], (batch_size, seq), device=device),
             "llm_input_ids": torch.randint(4, vocab[1], (batch_size, seq), device=device)}
    views["mt_attention_mask"] = torch.ones_like(views["mt_input_ids"])
    views["llm_attention_mask"] = torch.ones_like(views["llm_input_ids"])
    times = []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            student, teacher = stack(**views)[:2]
            squared_error(student, teacher).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def projected_hours(per_sample_flops: float, mfu: float, gpu: str) -> float:
    """The paper's stage 1 (PAPER_SAMPLES sequences) on 8 GPUs of kind `gpu` at `mfu`."""
    return PAPER_SAMPLES * per_sample_flops / (8 * PEAK_BF16_FLOPS[gpu] * mfu) / 3600


def sweep(stack, optimizer, args, device: torch.device) -> list[dict]:
    """One row per micro batch, doubling until --max-batch or until one does not fit."""
    llm_params, encoder_params = parameter_count(stack.llm), parameter_count(stack.mt_encoder)
    vocab = (stack.mt_encoder.config.vocab_size, stack.llm.config.vocab_size)
    peak = peak_flops(device)
    rows, batch_size = [], 1
    while batch_size <= args.max_batch:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = run_steps(stack, optimizer, batch_size, args.seq, args.steps, device, vocab)
        except torch.OutOfMemoryError:
            break
        tokens = batch_size * args.seq
        flops = step_flops(llm_params, encoder_params, tokens, tokens)
        rows.append({"micro_batch": batch_size, "step_s": seconds, "samples_per_s": batch_size / seconds,
                     "tokens_per_s": 2 * tokens / seconds, "step_tflop": flops / 1e12,
                     "mfu": flops / seconds / peak if peak else None,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
        print(f"micro batch {batch_size}: {seconds:.3f} s/step", flush=True)
        batch_size *= 2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def loop_row(args, device: torch.device, micro_batch: int, bare_tokens_per_s: float) -> dict:
    """The real trainer (`mtllm_train.train.train`: data loader, both views, statistics, metrics, one checkpoint)
    at the bare step's settings and micro batch, 1 process, over shards of the bundled English sample (texts
    joined so that both views fill --seq tokens; the tiny tokenizers stand in for the real ones: the ids, not
    the compute, differ). Its computed tokens per second against the bare step's is the pipeline's overhead."""
    work = Path(tempfile.mkdtemp(prefix="gpu_loop_"))
    texts = [json.loads(line)["text"] for line in (ROOT / "shards/sample/enwiki_sample.jsonl").open(encoding="utf-8")]
    documents = work / "documents.jsonl"
    documents.write_text("".join(json.dumps({"text": " ".join(texts[i:i + 8])}) + "\n"
                                 for i in range(0, len(texts), 8)), encoding="utf-8")
    build_shards([str(documents)], str(work / "shards"), str(ROOT / "configs/tiny/llm_tokenizer"),
                 str(ROOT / "configs/tiny/mt_tokenizer"), max_length=args.seq, shard_size=10, progress=False)
    settings = {**model_settings(args, device), "llm_tokenizer": str(ROOT / "configs/tiny/llm_tokenizer"),
                "mt_tokenizer": str(ROOT / "configs/tiny/mt_tokenizer"), "compile": args.compile}
    steps = args.loop_steps + 3  # the first 3 (compilation, allocator warm-up) are not timed
    cfg = validate(from_dict(Config, {
        "run": {"dir": str(work), "name": "loop"}, "model": settings,
        "data": {"shards": str(work / "shards"), "max_length": args.seq, "micro_batch_size": micro_batch,
                 "num_workers": 2},
        "train": {"steps": steps, "global_batch_size": micro_batch},
        "optim": {"lr": 1e-4}, "checkpoint": {"every": steps},
        "distributed": {"mixed_precision": "bf16" if device.type == "cuda" else "none"},
        "logging": {"progress_bar": False}}, ""))
    train(cfg)
    records = read_records(work / "loop" / "metrics.jsonl")[3:]
    computed = sorted((r["llm_tokens_per_s"] + r["mt_tokens_per_s"]) / r["padding_efficiency"] for r in records)
    tokens_per_s = computed[len(computed) // 2]
    shutil.rmtree(work, ignore_errors=True)
    return {"micro_batch": micro_batch, "tokens_per_s": tokens_per_s, "of_bare": tokens_per_s / bare_tokens_per_s,
            "padding_efficiency": records[-1]["padding_efficiency"]}


def markdown(result: dict) -> str:
    setting = (f"{result['base']} base, checkpointing {result['checkpointing']}, "
               f"compile {'on' if result['compile'] else 'off'}, {result['seq']} tokens per view")
    lines = [f"{result['device']}: {setting}", "",
             "| micro batch | step s | samples/s | tokens/s | MFU | peak GB |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        mfu = f"{row['mfu']:.3f}" if row["mfu"] else "-"
        memory = f"{row['peak_mem_gb']:.1f}" if row["peak_mem_gb"] else "-"
        lines.append(f"| {row['micro_batch']} | {row['step_s']:.3f} | {row['samples_per_s']:.1f} | "
                     f"{row['tokens_per_s']:.0f} | {mfu} | {memory} |")
    if "loop" in result:
        loop = result["loop"]
        lines += ["", f"The real train.py loop at micro batch {loop['micro_batch']}: {loop['tokens_per_s']:.0f} computed "
                      f"tokens/s, {loop['of_bare']:.3f} of the bare step's (padding efficiency "
                      f"{loop['padding_efficiency']:.2f})."]
    if "projected_8xA100_hours" in result:
        lines += ["", f"Paper's stage 1 at the best MFU: {result['projected_8xA100_hours']:.1f} h on 8xA100, "
                      f"{result['projected_8xH100_hours']:.1f} h on 8xH100 (paper: {PAPER_HOURS} h on 8xA100)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("bf16", "nf4", "fp8"), default="bf16",
                        help="frozen LLM: bf16, NF4 (bitsandbytes) or bf16 weights with float8 matmuls (torchao)")
    parser.add_argument("--checkpointing", default="none", help="model.activation_checkpointing: none, full, selective, every_<k>")
    parser.add_argument("--compile", action="store_true", help="model.compile: torch.compile each LLM layer")
    parser.add_argument("--seq", type=int, default=512, help="tokens per view")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per micro batch")
    parser.add_argument("--max-batch", type=int, default=64, help="largest micro batch to try")
    parser.add_argument("--loop-steps", type=int, default=20,
                        help="timed steps of the real train.py loop at the best micro batch (0: skip it)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the script)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.seq < 8 or args.steps < 1 or args.max_batch < 1:
        parser.error("--seq must be >= 8, --steps and --max-batch >= 1")
    try:
        args.checkpointing = checkpointing_policy(args.checkpointing)
    except ConfigError as err:
        parser.error(str(err))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the full shapes need one; use --tiny to check the script on CPU")

    start = time.perf_counter()
    stack = build(args, device)
    optimizer = build_optimizer(trainable_parameters(stack), OptimConfig(lr=1e-4))
    build_s = time.perf_counter() - start
    rows = sweep(stack, optimizer, args, device)
    if not rows:
        raise SystemExit("even micro batch 1 does not fit")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "base": args.base, "checkpointing": args.checkpointing, "compile": args.compile, "seq": args.seq,
        "build_s": build_s, "llm_params": parameter_count(stack.llm),
        "encoder_params": parameter_count(stack.mt_encoder),
        "rows": rows,
    }
    best = max(rows, key=lambda row: row["samples_per_s"])
    if args.loop_steps:
        del stack, optimizer  # the trainer builds its own stack
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["loop"] = loop_row(args, device, best["micro_batch"], best["tokens_per_s"])
    if best["mfu"]:
        per_sample_flops = best["step_tflop"] * 1e12 / best["micro_batch"]
        result["projected_8xA100_hours"] = projected_hours(per_sample_flops, best["mfu"], "A100")
        result["projected_8xH100_hours"] = projected_hours(per_sample_flops, best["mfu"], "H100")
    table = markdown(result)
    print(json.dumps(result, indent=1))
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as results:
            results.write(f"\n## GPU throughput, {stamp}\n\n{table}\n\nBuilt in {build_s:.0f} s.\n")


if __name__ == "__main__":
    main()

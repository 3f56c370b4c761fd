"""The GPU check of the stage-1 step at the paper's shapes, in one process that fits a 15-minute GPU slot: an
NLLB-600M-shaped encoder under a Llama-3-8B-shaped bidirectional LLM (random init), 512 tokens per view.

Variants run in order of importance (--only picks some), each from a fresh dynamo (the layers share one code
object, so one cache of graphs and one recompile limit), each result appended to --out as one JSON line the
moment it exists, and a variant that would run past --deadline is skipped, so a call cut short still returns
everything measured before. Per variant: step time (median of --steps after 2 warm-up steps), MFU, peak
memory, build and first-step (compile) seconds, dynamo's graph breaks and graphs.

    bare_*   the bare step: random ids filling both views, teacher + student forward, MSE, backward, AdamW
    loop_*   the real trainer (mtllm_train.train.train) at the bare step's settings over --loop-steps steps:
             shards of the bundled sample cut to varied lengths, padded to a grid of 64 (data.pad_multiple),
             or (_full) filling every view as the bare step's random ids do; 2 loader workers, several epoch
             boundaries. MFU over the steps after the first 2 (compile), and in
             which steps graphs were compiled; of_bare = its MFU / the bare step's in this process.

    MFU = mtllm_train.metrics.step_flops (the formula the trainer logs: matmuls without the embedding tables,
          attention, the backward's input and adapter gradients) / step time / the GPU's dense bf16 peak.

    python bench/gpu_throughput.py --out gpu.jsonl --deadline 420     # on an H100 / H200: every variant
    python bench/gpu_throughput.py --tiny --steps 1 --out tiny.jsonl  # the script's check on CPU

--write appends the table, with the GPU's name, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from transformers.masking_utils import create_causal_mask  # noqa: E402

import mtllm_train.distributed as distributed  # noqa: E402
import mtllm_train.model.stack as stack_module  # noqa: E402
import mtllm_train.train as train_module  # noqa: E402
from mtllm_train.config import Config, ConfigError, ModelConfig, OptimConfig, from_dict, validate  # noqa: E402
from mtllm_train.run_folder import RunFolder  # noqa: E402
from mtllm_train.data.shard_writer import build_shards  # noqa: E402
from mtllm_train.metrics import PEAK_BF16_FLOPS, flop_shape, peak_flops, step_flops  # noqa: E402
from mtllm_train.model.fp8 import fp8_base  # noqa: E402
from mtllm_train.model.loss import squared_error  # noqa: E402
from mtllm_train.model.stack import build_stack, trainable_parameters  # noqa: E402
from mtllm_train.optim import build_optimizer  # noqa: E402

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


def variant(kind="bare", base="bf16", checkpointing="none", compile=True, micro=16, scaling="rowwise",
            mask="tensor", lengths="varied", cost=60):
    """mask: the attention mask as the stack passes it (a tensor always), or "skipped" where a batch has no
    padding (transformers' default, which lets SDPA run its flash kernel). lengths (loops): "varied" documents
    padded to a grid of 64, or "full" ones that fill every view (the bare step's shape, static). cost: seconds
    it takes on an H200 (build, compile, steps), for the deadline."""
    return {"kind": kind, "base": base, "checkpointing": checkpointing, "compile": compile, "micro": micro,
            "scaling": scaling, "mask": mask, "lengths": lengths, "cost": cost}


# In order of importance.
VARIANTS = {
    "bare_bf16_compile": variant(cost=30),
    "loop_bf16_compile": variant(kind="loop", cost=100),
    "loop_bf16_compile_full": variant(kind="loop", lengths="full", cost=70),
    "bare_fp8_rowwise_compile": variant(base="fp8", cost=40),
    "bare_fp8_tensorwise_compile": variant(base="fp8", scaling="tensorwise", cost=40),
    "bare_bf16_compile_mask_skipped": variant(mask="skipped", cost=30),
    "bare_nf4_compile": variant(base="nf4", cost=70),
    "bare_bf16_eager": variant(compile=False, cost=30),
    "bare_nf4_eager": variant(base="nf4", compile=False, cost=60),
    "bare_selective_compile_32": variant(checkpointing="selective", micro=32, cost=80),
    "bare_full_compile_32": variant(checkpointing="full", micro=32, cost=80),
    "bare_bf16_compile_32": variant(micro=32, cost=60),
    "loop_fp8_rowwise_compile": variant(kind="loop", base="fp8", cost=120),
}


def model_settings(spec: dict, tiny: bool, device: torch.device) -> dict:
    """The `model` section of a variant: the paper's shapes (or tiny ones), random init."""
    gpu = device.type == "cuda"
    return {"mt_encoder": TINY_ENCODER if tiny else NLLB_600M, "llm": TINY_LLM if tiny else LLAMA3_8B,
            "bidirectional": True, "quantization": {"bf16": "none"}.get(spec["base"], spec["base"]),
            "fp8_scaling": spec["scaling"], "dtype": "bfloat16" if gpu else "float32",
            "quant_compute_dtype": "bfloat16" if gpu else "float32",
            "activation_checkpointing": spec["checkpointing"], "pooling": "mean", "compile": spec["compile"]}


def dynamo_report() -> dict:
    """Graph breaks (count and the most frequent reasons) and graphs dynamo made since the last reset."""
    breaks = counters["graph_break"]
    return {"graph_breaks": sum(breaks.values()), "graphs": counters["stats"]["unique_graphs"],
            "break_reasons": [reason.splitlines()[0][:160] for reason, _ in breaks.most_common(3)]}


def bare_step(spec: dict, args, device: torch.device) -> dict:
    start = time.perf_counter()
    model = from_dict(ModelConfig, model_settings(spec, args.tiny, device), "model")
    # Random init on the GPU itself (the default device inside): initialising 8B parameters on the CPU takes minutes.
    with torch.device(device):
        stack = build_stack(model, device)
    if spec["base"] == "fp8":
        fp8_base(stack.llm, device, spec["scaling"])  # as train.py does; refused off FP8 GPUs
    if spec["compile"]:
        distributed.compile_layers(stack.llm, dynamic_lengths=False)  # every batch [micro, seq]
    if spec["mask"] == "skipped":
        stack_module.create_causal_mask = lambda **kwargs: create_causal_mask(**{**kwargs, "allow_is_causal_skip": True})
    optimizer = build_optimizer(trainable_parameters(stack), OptimConfig(lr=1e-4))
    build_s = time.perf_counter() - start
    vocab = (stack.mt_encoder.config.vocab_size, stack.llm.config.vocab_size)
    batch, seq = spec["micro"], args.seq
    views = {"mt_input_ids": torch.randint(4, vocab[0], (batch, seq), device=device),
             "llm_input_ids": torch.randint(4, vocab[1], (batch, seq), device=device)}
    views["mt_attention_mask"] = torch.ones_like(views["mt_input_ids"])
    views["llm_attention_mask"] = torch.ones_like(views["llm_input_ids"])
    times = []
    for _ in range(args.steps + 2):
        synchronize(device)
        step_start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = stack(**views)
            student, teacher = out.student_pooled, out.teacher_pooled
            squared_error(student, teacher).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - step_start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    tokens = batch * seq
    flops = step_flops(flop_shape(stack.llm), flop_shape(stack.mt_encoder), tokens, tokens * seq, tokens, tokens * seq)
    peak = peak_flops(device)
    return {"step_s": step_s, "first_step_s": times[0], "build_s": build_s, "step_tflop": flops / 1e12,
            "mfu": flops / step_s / peak if peak else None, "samples_per_s": batch / step_s}


def loop_shards(work: Path, seq: int, lengths: str) -> Path:
    """300 documents of the bundled sample in shards of 10 (about 18 micro-batches of 16 an epoch): "varied" cuts
    them to 40-440 words (with the tiny tokenizers 60 to over 512 tokens, so lengths vary and many documents
    fill the view, as FineWeb's do); "full" joins 8 texts into each, so every view is cut at `seq`."""
    folder = work / f"shards_{lengths}"
    if not (folder / "manifest.json").is_file():
        with open(ROOT / "shards/sample/enwiki_sample.jsonl", encoding="utf-8") as lines:
            texts = [json.loads(line)["text"] for line in lines]
        if lengths == "varied":
            docs = [" ".join(texts[i % len(texts)].split()[:40 + (53 * i) % 400]) for i in range(300)]
        else:
            docs = [" ".join(texts[(i + k) % len(texts)] for k in range(8)) for i in range(300)]
        documents = work / f"documents_{lengths}.jsonl"
        documents.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
        build_shards([str(documents)], str(folder), str(ROOT / "configs/tiny/llm_tokenizer"),
                     str(ROOT / "configs/tiny/mt_tokenizer"), max_length=seq, shard_size=10, progress=False)
    return folder


def loop_run(spec: dict, args, device: torch.device, work: Path) -> dict:
    """The real trainer; which step each graph was compiled in (the backend is wrapped to note it)."""
    shards = loop_shards(work, args.seq, spec["lengths"])
    step, compiled_in = [0], []
    real_backend, real_step_batches, real_build = (distributed.COMPILE_BACKEND, train_module.step_batches,
                                                   train_module.build_stack)

    def noting_backend(graph_module, example_inputs):
        compiled_in.append(step[0])
        return torch._dynamo.lookup_backend(real_backend)(graph_module, example_inputs)

    def counting_step_batches(*step_args, **kwargs):
        step[0] += 1
        return real_step_batches(*step_args, **kwargs)

    def build_on_device(model_cfg, on):  # random init on the GPU: 1 s for the 8B layers there, minutes on the CPU
        with torch.device(on):
            return real_build(model_cfg, on)

    distributed.COMPILE_BACKEND, train_module.step_batches = noting_backend, counting_step_batches
    train_module.build_stack = build_on_device
    name = f"loop_{time.monotonic_ns()}"
    try:
        cfg = validate(from_dict(Config, {
            "run": {"dir": str(work), "name": name},
            "model": {**model_settings(spec, args.tiny, device), "llm_tokenizer": str(ROOT / "configs/tiny/llm_tokenizer"),
                      "mt_tokenizer": str(ROOT / "configs/tiny/mt_tokenizer")},
            "data": {"shards": str(shards), "max_length": args.seq, "micro_batch_size": spec["micro"],
                     "num_workers": 2, "pad_multiple": 64 if spec["lengths"] == "varied" else args.seq},
            "train": {"steps": args.loop_steps, "global_batch_size": spec["micro"]},
            "optim": {"lr": 1e-4}, "checkpoint": {"every": args.loop_steps},
            "distributed": {"mixed_precision": "bf16" if device.type == "cuda" else "none"},
            "logging": {"progress_bar": False}}, ""))
        train_module.train(cfg)
    finally:
        distributed.COMPILE_BACKEND, train_module.step_batches = real_backend, real_step_batches
        train_module.build_stack = real_build
    records = RunFolder(work / name).metrics()
    seconds = [spec["micro"] / r["seqs_per_s"] for r in records]
    warm, warm_s = records[2:], seconds[2:]
    median = sorted(warm_s)[len(warm_s) // 2]
    result = {"steps": len(records), "first_steps_s": [round(s, 2) for s in seconds[:2]],
              "warm_median_step_s": median, "warm_mean_step_s": sum(warm_s) / len(warm_s),
              "slow_steps": [r["step"] for r, s in zip(warm, warm_s) if s > 1.5 * median],
              "compiled_in_steps": compiled_in, "epochs": records[-1]["epoch"] + 1,
              "padding_efficiency": sum(r["padding_efficiency"] for r in records) / len(records),
              "data_wait_frac_max": max(r["data_wait_frac"] for r in warm)}
    if records[-1].get("mfu") is not None:  # the trainer's own MFU, the same formula: summed FLOPs / summed time
        result["mfu"] = sum(r["mfu"] * s for r, s in zip(warm, warm_s)) / sum(warm_s)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, spec: dict, args, device: torch.device, work: Path) -> dict:
    torch._dynamo.reset()
    counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"variant": name, **{k: v for k, v in spec.items() if k != "cost"}}
    started = time.perf_counter()
    try:
        row.update(bare_step(spec, args, device) if spec["kind"] == "bare" else loop_run(spec, args, device, work))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except ConfigError as err:  # e.g. fp8 refused on a GPU without float8 matmuls (or on the CPU, --tiny)
        row["error"] = str(err)
    stack_module.create_causal_mask = create_causal_mask  # as a mask="skipped" variant found it
    row.update(dynamo_report(), seconds=time.perf_counter() - started)
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    torch._dynamo.reset()  # the compiled layers hold the stack: free it before the next variant
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def projected_hours(per_sample_flops: float, mfu: float, gpu: str) -> float:
    """The paper's stage 1 (PAPER_SAMPLES sequences) on 8 GPUs of kind `gpu` at `mfu`."""
    return PAPER_SAMPLES * per_sample_flops / (8 * PEAK_BF16_FLOPS[gpu] * mfu) / 3600


def markdown(rows: list[dict], device_name: str, seq: int) -> str:
    bare = {row["variant"]: row for row in rows}.get("bare_bf16_compile", {})
    lines = [f"{device_name}, {seq} tokens per view, {'tiny' if device_name == 'cpu' else 'paper'} shapes (random init)", "",
             "| variant | micro batch | step s | MFU | vs bf16 compiled | peak GB | graph breaks / graphs | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['micro']} | {row['error']} | | | | | |")
            continue
        if row["kind"] == "loop":
            step, ratio = row["warm_mean_step_s"], row["mfu"] / bare["mfu"] if row.get("mfu") and bare.get("mfu") else 0
            first = "/".join(str(s) for s in row["first_steps_s"])
        else:
            step, first = row["step_s"], f"{row['first_step_s']:.1f}"
            ratio = bare["step_s"] / step if bare.get("step_s") else 0
        mfu = f"{row['mfu']:.3f}" if row.get("mfu") else "-"
        memory = f"{row['peak_mem_gb']:.1f}" if row.get("peak_mem_gb") else "-"
        lines.append(f"| {row['variant']} | {row['micro']} | {step:.3f} | {mfu} | {ratio:.3f}x | {memory} | "
                     f"{row['graph_breaks']} / {row['graphs']} | {first} |")
    lines += ["", "vs bf16 compiled: for bare variants its step time over theirs (speed-up), for loops their MFU over its."]
    loops = [row for row in rows if row["kind"] == "loop" and "error" not in row]
    for row in loops:
        lines.append(f"{row['variant']}: {row['steps']} steps over {row['epochs']} epochs, graphs compiled in steps "
                     f"{row['compiled_in_steps']}, steps over 1.5x the median: {row['slow_steps']}, padding efficiency "
                     f"{row['padding_efficiency']:.2f}, largest data wait {row['data_wait_frac_max']:.2f} of a step.")
    if bare.get("mfu"):
        per_sample = bare["step_tflop"] * 1e12 / bare["micro"]
        lines.append(f"Paper's stage 1 at the bare bf16 MFU: {projected_hours(per_sample, bare['mfu'], 'A100'):.1f} h "
                     f"on 8xA100, {projected_hours(per_sample, bare['mfu'], 'H100'):.1f} h on 8xH100 (paper: "
                     f"{PAPER_HOURS} h on 8xA100).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--seq", type=int, default=512, help="tokens per view")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per bare variant (after 2 warm-up steps)")
    parser.add_argument("--loop-steps", type=int, default=44, help="steps of each loop variant")
    parser.add_argument("--deadline", type=float, default=480, help="seconds: skip a variant that would end past it")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the script)")
    parser.add_argument("--out", default=None, help="append each result here as a JSON line, as it comes")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.seq < 8 or args.steps < 1 or args.loop_steps < 3:
        parser.error("--seq must be >= 8, --steps >= 1, --loop-steps >= 3")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the full shapes need one; use --tiny to check the script on CPU")
    if args.tiny:
        distributed.COMPILE_BACKEND = "eager"  # no C++ compiler needed on CPU; dynamo's graphs all the same
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in names:
            spec = VARIANTS[name]
            if not args.tiny and time.perf_counter() - started + spec["cost"] > args.deadline:
                row = {"variant": name, "skipped": f"--deadline {args.deadline:.0f} s"}
            else:
                row = {**measure(name, spec, args, device, Path(work)), "device": device_name}
                rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as out:
                    out.write(json.dumps(row) + "\n")
    table = markdown(rows, device_name, args.seq)
    print(table)
    if args.write:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as results:
            results.write(f"\n## GPU check, {stamp}\n\n{table}\n")


if __name__ == "__main__":
    main()

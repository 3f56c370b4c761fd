"""Checkpoint selection as in the paper's Table 1, computed from per-step dev scores.

- S-DEV: one checkpoint for all languages, the one with the best source-language (English) dev score;
- T-DEV: per target language, the checkpoint with the best dev score in that language (an upper bound that
  assumes target-language dev data).
Ties go to the earlier step. Test scores are needed only where a selection lands (`needed_tests`), so a run
keeps just those checkpoints and tests just those.

The dev scores a stage-2 run records while training live in RUN/validation.jsonl, one line per validated step:
{"step": N, "dev": {"source": score, "<benchmark>:<code>": score, ...}}.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic
from mtllm_train.run_folder import RunFolder

Scores = dict[int, dict[str, float]]  # scores[step][language]
SOURCE = "source"  # the key of the English (source-language) dev score


def read_validation(run_dir: Path | RunFolder) -> Scores:
    path = RunFolder(run_dir).validation_file
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["step"]: record["dev"] for record in records}


def write_validation(run_dir: Path | RunFolder, scores: Scores) -> None:
    write_atomic(RunFolder(run_dir).validation_file, "".join(json.dumps({"step": step, "dev": scores[step]}) + "\n"
                                              for step in sorted(scores)))


def source_best_step(run_dir: Path | RunFolder) -> int:
    """The S-DEV checkpoint of a run: its best English dev score."""
    dev = read_validation(run_dir)
    if not dev:
        raise ConfigError(f"{run_dir}: no {RunFolder(run_dir).validation_file.name} with dev scores; run the task-train command to its end")
    return best_step(dev, SOURCE)


def validation_line(step: int, scores: Scores) -> str:
    """What a stage-2 run prints at a validation: English (what S-DEV selects on) with the best so far, then each
    target language's dev score."""
    best, dev = best_step(scores, SOURCE), scores[step]
    targets = "  ".join(f"{key} {value:.3f}" for key, value in dev.items() if key != SOURCE)
    return (f"step {step} dev: English {dev[SOURCE]:.3f} (best {scores[best][SOURCE]:.3f} at step {best}, the S-DEV "
            f"checkpoint so far)  {targets}")


def best_step(scores: Scores, language: str) -> int:
    steps = [step for step in sorted(scores) if language in scores[step]]
    if not steps:
        raise ConfigError(f"no dev score for language {language!r} at any validated step")
    return max(steps, key=lambda step: (scores[step][language], -step))


def needed_tests(dev: Scores, source: str, languages: list[str]) -> dict[int, set[str]]:
    """{step: languages} whose test scores S-DEV and T-DEV select."""
    needed: dict[int, set[str]] = {best_step(dev, source): set(languages)}
    for language in languages:
        needed.setdefault(best_step(dev, language), set()).add(language)
    return needed


def select(dev: Scores, test: Scores, source: str = "en", languages: list[str] | None = None) -> dict:
    """{"s_dev": {"step", "test": {lang: score}}, "t_dev": {lang: {"step", "test"}}} over `languages`
    (default: every language with a test score)."""
    languages = languages or sorted({language for step in test for language in test[step]})

    def test_score(step: int, language: str, selection: str) -> float:
        if language not in test.get(step, {}):
            raise ConfigError(f"no test score for {language!r} at step {step}, the {selection} checkpoint")
        return test[step][language]

    s_step = best_step(dev, source)
    t_dev = {}
    for language in languages:
        step = best_step(dev, language)
        t_dev[language] = {"step": step, "test": test_score(step, language, "T-DEV")}
    return {"s_dev": {"step": s_step, "test": {lang: test_score(s_step, lang, "S-DEV") for lang in languages}},
            "t_dev": t_dev}


def markdown_table(selection: dict, languages: list[str] | None = None) -> str:
    """Rows S-DEV and T-DEV, a column per language and the average, like the paper's Table 1."""
    languages = languages or sorted(selection["t_dev"])
    s_scores = [selection["s_dev"]["test"][lang] for lang in languages]
    t_scores = [selection["t_dev"][lang]["test"] for lang in languages]
    header = "| selection | " + " | ".join(languages) + " | avg |"
    rule = "|---" * (len(languages) + 2) + "|"
    rows = [f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * sum(values) / len(values):.1f} |"
            for name, values in (("S-DEV", s_scores), ("T-DEV", t_scores))]
    return "\n".join([header, rule, *rows])

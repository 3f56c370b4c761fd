"""Checkpoint selection as in the paper's Table 1, computed from per-step dev and test scores.

- S-DEV: one checkpoint for all languages, the one with the best source-language (English) dev score;
- T-DEV: per target language, the checkpoint with the best dev score in that language (an upper bound that
  assumes target-language dev data).
Ties go to the earlier step.
"""

from __future__ import annotations

from mtllm_train.config import ConfigError

Scores = dict[int, dict[str, float]]  # scores[step][language]


def _best_step(scores: Scores, language: str) -> int:
    steps = [step for step in sorted(scores) if language in scores[step]]
    if not steps:
        raise ConfigError(f"no dev score for language {language!r} at any validated step")
    return max(steps, key=lambda step: (scores[step][language], -step))


def select(dev: Scores, test: Scores, source: str = "en") -> dict:
    """{"s_dev": {"step", "test": {lang: score}}, "t_dev": {lang: {"step", "test"}}} over the test languages."""
    missing = sorted(set(dev) ^ set(test))
    if missing:
        raise ConfigError(f"dev and test scores cover different steps ({', '.join(map(str, missing))})")
    s_step = _best_step(dev, source)
    languages = sorted({language for step in test for language in test[step]})
    t_dev = {}
    for language in languages:
        step = _best_step(dev, language)
        t_dev[language] = {"step": step, "test": test[step][language]}
    return {"s_dev": {"step": s_step, "test": {lang: test[s_step][lang] for lang in languages if lang in test[s_step]}},
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

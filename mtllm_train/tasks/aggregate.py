"""`mtllm aggregate`: the paper's table over seeds. Several stage-2 runs of the same row (one per seed), each
evaluated (`mtllm evaluate`), give per row and selection (S-DEV, T-DEV) the mean and standard deviation over
runs of each language's test score and of the average over target languages.

The standard deviation is the sample one (n - 1 in the denominator), as over a handful of seeds; one run gives 0.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic
from mtllm_train.run_folder import RunFolder

SELECTIONS = ("s_dev", "t_dev")


def selected_scores(selection: dict, kind: str) -> dict[str, float]:
    """A result's test score per target language under S-DEV (one checkpoint) or T-DEV (one per language)."""
    if kind == "s_dev":
        return dict(selection["s_dev"]["test"])
    return {language: chosen["test"] for language, chosen in selection["t_dev"].items()}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": len(values)}


def aggregate(runs: list[str], out: str) -> dict:
    """{row: {selection: {"languages": {lang: {mean, std, runs}}, "average": {mean, std, runs}}}}, written to
    OUT.json and OUT.md."""
    if len(runs) < 1:
        raise ConfigError("mtllm aggregate: give the run folders of one row, one per seed")
    results: dict[str, list[dict]] = {}
    for run in runs:
        found = RunFolder(run).results()
        if not found:
            raise ConfigError(f"{run}: no results/ (run `mtllm evaluate --run {run}` first)")
        for row, result in found.items():
            results.setdefault(row, []).append(result)
    table, lines = {}, []
    for row, per_run in sorted(results.items()):
        if len(per_run) != len(runs):
            raise ConfigError(f"row {row}: evaluated in {len(per_run)} of the {len(runs)} runs; evaluate every run")
        metric, columns = per_run[0]["metric"], sorted(selected_scores(per_run[0]["selection"], "s_dev"))
        table[row] = {"metric": metric}
        lines += [f"## {row} ({metric}, mean ± std over {len(runs)} runs)", "",
                  "| selection | " + " | ".join(columns) + " | average |", "|---|" + "---|" * (len(columns) + 1)]
        for kind in SELECTIONS:
            scores = [selected_scores(result["selection"], kind) for result in per_run]
            languages = sorted(scores[0])
            if any(sorted(score) != languages for score in scores):
                raise ConfigError(f"row {row}: the runs were tested on different languages; aggregate runs of one row")
            table[row][kind] = {"languages": {lang: _mean_std([score[lang] for score in scores]) for lang in languages},
                                "average": _mean_std([statistics.fmean(score.values()) for score in scores])}
            cells = [table[row][kind]["languages"][lang] for lang in languages] + [table[row][kind]["average"]]
            lines.append(f"| {kind.replace('_', '-').upper()} | " +
                         " | ".join(f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}" for cell in cells) + " |")
        lines.append("")
    write_atomic(Path(f"{out}.json"), json.dumps(table, indent=1))
    write_atomic(Path(f"{out}.md"), "\n".join(lines))
    return table

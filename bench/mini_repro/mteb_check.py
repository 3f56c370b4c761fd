"""`mtllm mteb` on real weights: the mini reproduction's stage-1 stack (multilingual-e5-small under
all-MiniLM-L6-v2) on an mteb bitext task over the in-training probe's set, checked against `mtllm
evaluate-embedder` on the same set.

The probe set (.cache/mini_repro/probe_bitext.jsonl, written by run.py: 6 languages x 200 sentences with their
English) becomes an mteb BitextMining task with two subsets per language: `L-eng_Latn` (L's sentences find
their English among the 200 of L) and `eng_Latn-L` (the English find their L sentence among the 200). mteb's
accuracy of `eng_Latn-L` is, by definition, evaluate-embedder's English -> X R@1 of the stack; mteb's `L-eng_Latn`
searches 200 English sentences, evaluate-embedder's X -> English all 1,049 of the set (so it can only be
higher). The script exports the run's best checkpoint, runs both commands, and prints the comparison.

    .venv/bin/python bench/mini_repro/mteb_check.py [--run RUN] [--out runs/mteb_check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

from mtllm_train.mteb_eval import local_task_metadata

ROOT = Path(__file__).resolve().parents[2]
PROBE_SET = ROOT / ".cache/mini_repro/probe_bitext.jsonl"
RUN = ROOT / ".cache/mini_repro/runs/mini_repro_e5_minilm__start_fix_spans"


def probe_pairs() -> dict[str, list[tuple[str, str]]]:
    """{language: [(text, its English)]} of the probe set, in file order."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for line in PROBE_SET.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        pairs.setdefault(row["lang"], []).append((row["text"], row["english"]))
    return pairs


class ProbeBitext(AbsTaskBitextMining):
    LANGUAGES = ("deu_Latn", "fra_Latn", "spa_Latn", "rus_Cyrl", "jpn_Jpan", "zho_Hans")
    metadata = local_task_metadata(
        "MiniReproProbeBitext", "BitextMining",
        {subset: [code.replace("_", "-") for code in subset.split("-")]
         for lang in LANGUAGES for subset in (f"{lang}-eng_Latn", f"eng_Latn-{lang}")}, "accuracy")

    def load_data(self, **kwargs) -> None:
        pairs = probe_pairs()
        self.dataset = {}
        for lang in self.LANGUAGES:
            texts, english = [text for text, _ in pairs[lang]], [source for _, source in pairs[lang]]
            self.dataset[f"{lang}-eng_Latn"] = DatasetDict(test=Dataset.from_dict({"sentence1": texts, "sentence2": english}))
            self.dataset[f"eng_Latn-{lang}"] = DatasetDict(test=Dataset.from_dict({"sentence1": english, "sentence2": texts}))
        self.data_loaded = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(RUN))
    parser.add_argument("--out", default=str(ROOT / "runs/mteb_check"))
    args = parser.parse_args()
    if not PROBE_SET.is_file() or not Path(args.run).is_dir():
        sys.exit(f"mteb_check: needs the mini reproduction's probe set and run ({PROBE_SET}, {args.run}): "
                 f"run `make mini-repro` first")
    sys.path.insert(0, str(Path(__file__).parent))
    from run import mtllm

    out = Path(args.out)
    export = out / "export"
    mtllm("export", "--run", args.run, "--best", "--out", str(export), "--force")
    mtllm("evaluate-embedder", "--model", str(export), "--bitext", str(PROBE_SET), "--out", str(out / "embedder"))
    mtllm("mteb", "--model", str(export), "--tasks", f"{Path(__file__).resolve()}:ProbeBitext",
          "--out", str(out / "mteb"))
    stack = json.loads((out / "embedder.json").read_text())["rows"]["MT-LLM (X and English by the stack)"]
    mteb_rows = {row["subset"]: row["main_score"] for row in json.loads((out / "mteb/summary.json").read_text())["rows"]}
    lines = ["| language | English -> X: evaluate-embedder | English -> X: mteb | X -> English among 1,049: "
             "evaluate-embedder | X -> English among 200: mteb |", "|---|---|---|---|---|"]
    for lang in ProbeBitext.LANGUAGES:
        lines.append(f"| {lang} | {stack[lang]['en2x']:.3f} | {mteb_rows[f'eng_Latn-{lang}']:.3f} | "
                     f"{stack[lang]['x2en']:.3f} | {mteb_rows[f'{lang}-eng_Latn']:.3f} |")
    table = "\n".join(lines)
    print(table)
    (out / "comparison.md").write_text(table + "\n")
    same = all(abs(stack[lang]["en2x"] - mteb_rows[f"eng_Latn-{lang}"]) < 1e-6 for lang in ProbeBitext.LANGUAGES)
    print("English -> X: mteb equals evaluate-embedder in every language" if same else
          "English -> X: mteb and evaluate-embedder DIFFER")


if __name__ == "__main__":
    main()

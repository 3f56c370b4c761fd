"""mteb tasks over the shipped bitext sample (shards/sample/bitext_probe.jsonl), for `mtllm mteb` without the hub:
`--tasks tests/mteb_tasks.py:SampleBitext` and the others. Each shape of language labelling mteb has:
two-language subsets (told apart by column or by script), a parallel task (a column per language) and
one-language subsets; and tasks that cannot be read."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining

from mtllm_train.mteb_eval import local_task_metadata as metadata

ROOT = Path(__file__).resolve().parents[1]
ROWS = [json.loads(line) for line in open(ROOT / "shards/sample/bitext_probe.jsonl", encoding="utf-8")]


def texts(lang: str) -> list[str]:
    """The sample's sentences in one language (FLORES-200 code), in the English sentences' order."""
    if lang == "eng_Latn":
        return [row["english"] for row in ROWS if row["lang"] == "deu_Latn"]
    return [row["text"] for row in ROWS if row["lang"] == lang]


class SampleBitext(AbsTaskBitextMining):
    """Subsets of two languages: sentence1 in the first, sentence2 in the second (English first in one)."""

    metadata = metadata("SampleBitext", "BitextMining", {"deu_Latn-eng_Latn": ["deu-Latn", "eng-Latn"],
                                                         "eng_Latn-fra_Latn": ["eng-Latn", "fra-Latn"]}, "accuracy")

    def load_data(self, **kwargs) -> None:
        self.dataset = {subset: DatasetDict(test=Dataset.from_dict({"sentence1": texts(first), "sentence2": texts(second)}))
                        for subset, (first, second) in ((s, s.split("-")) for s in self.metadata.eval_langs)}
        self.data_loaded = True


class SampleParallelBitext(AbsTaskBitextMining):
    """FLORES-style: one column per language, every pair of them a subset."""

    parallel_subsets = True
    metadata = metadata("SampleParallelBitext", "BitextMining",
                        {"spa_Latn-eng_Latn": ["spa-Latn", "eng-Latn"], "rus_Cyrl-eng_Latn": ["rus-Cyrl", "eng-Latn"]},
                        "accuracy")

    def load_data(self, **kwargs) -> None:
        self.dataset = DatasetDict(test=Dataset.from_dict({lang: texts(lang) for lang in ("spa_Latn", "rus_Cyrl",
                                                                                            "eng_Latn")}))
        self.data_loaded = True


STS_SCORES = [(i * 7) % 6 for i in range(16)]  # any gold scores: the test computes the same correlation


class SampleSTS(AbsTaskSTS):
    """One language per subset. `pcm` (Nigerian Pidgin, which NLLB-200 lacks) holds the English sentences: it
    needs a fallback."""

    metadata = metadata("SampleSTS", "STS", {"deu": ["deu-Latn"], "pcm": ["pcm-Latn"]}, "cosine_spearman")

    def load_data(self, **kwargs) -> None:
        def rows(lang: str) -> DatasetDict:
            sentences = texts(lang)
            return DatasetDict(test=Dataset.from_dict({"sentence1": sentences, "sentence2": sentences[3:] + sentences[:3],
                                                       "score": STS_SCORES}))

        self.dataset = {"deu": rows("deu_Latn"), "pcm": rows("eng_Latn")}
        self.data_loaded = True


class SampleCrossSTS(AbsTaskSTS):
    """Two-language subsets. `rus-eng` lists Russian first but holds it in sentence2 (as mteb's data may): the
    scripts tell the columns apart. `deu-eng` (one script): its columns follow its languages' order."""

    metadata = metadata("SampleCrossSTS", "STS", {"rus-eng": ["rus-Cyrl", "eng-Latn"],
                                                  "deu-eng": ["deu-Latn", "eng-Latn"]}, "cosine_spearman")

    def load_data(self, **kwargs) -> None:
        def rows(first: list[str], second: list[str]) -> DatasetDict:
            return DatasetDict(test=Dataset.from_dict({"sentence1": first, "sentence2": second, "score": STS_SCORES}))

        self.dataset = {"rus-eng": rows(texts("eng_Latn"), texts("rus_Cyrl")),
                        "deu-eng": rows(texts("deu_Latn"), texts("eng_Latn"))}
        self.data_loaded = True


class SampleMisnamedParallel(AbsTaskBitextMining):
    """A parallel task whose columns are not language codes (de, en): its language cannot be told."""

    parallel_subsets = True
    metadata = metadata("SampleMisnamedParallel", "BitextMining", {"de-en": ["deu-Latn", "eng-Latn"]}, "accuracy")

    def load_data(self, **kwargs) -> None:
        self.dataset = DatasetDict(test=Dataset.from_dict({"de": texts("deu_Latn"), "en": texts("eng_Latn")}))
        self.data_loaded = True


class SamplePairs(AbsTaskPairClassification):
    """A pair classification task whose only subset mixes two languages: mteb does not say which text is in
    which, so it is refused."""

    metadata = metadata("SamplePairs", "PairClassification", {"deu-eng": ["deu-Latn", "eng-Latn"]}, "max_ap")

    def load_data(self, **kwargs) -> None:
        raise AssertionError("a refused task is never loaded")

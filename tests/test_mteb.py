"""`mtllm mteb`: a stage-1 export on mteb tasks, each text read by the MT encoder in its subset's language.
No mteb task can run here (they read the hub), so the tasks are defined over the shipped bitext sample
(tests/mteb_tasks.py) and passed as FILE.py:CLASS, as a user's own task would be."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from conftest import train_overrides
from mteb_tasks import STS_SCORES, texts
from mtllm_train.__main__ import main
from mtllm_train.config import load_config
from mtllm_train.export import export_run, load_mtllm
from mtllm_train.mteb_eval import MTEB_ALIASES, find_tasks, keep_readable_subsets, leaf_tasks
from mtllm_train.train import train

TASKS = "tests/mteb_tasks.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, train_shards):
    root = tmp_path_factory.mktemp("mteb")
    train(load_config("configs/tiny.yaml", train_overrides(root, train_shards, **{"run.name": "s1", "train.steps": 8})))
    return export_run(str(root / "s1"), str(root / "model"))


def _cosines(model, queries: list[str], query_lang: str, candidates: list[str], candidate_lang: str) -> torch.Tensor:
    return (F.normalize(model.encode(queries, lang=query_lang), dim=-1)
            @ F.normalize(model.encode(candidates, lang=candidate_lang), dim=-1).T)


def test_mteb_reads_each_text_in_its_subsets_language(exported, tmp_path, capsys):
    out = tmp_path / "mteb"
    assert main(["mteb", "--model", str(exported), "--tasks", f"{TASKS}:SampleBitext", f"{TASKS}:SampleParallelBitext",
                 f"{TASKS}:SampleSTS", f"{TASKS}:SampleCrossSTS", "--fallback", "pcm-Latn=eng_Latn",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    read_as = [(r["task"], r["subset"], r["lang"], r["by"], r["texts"]) for r in summary["read_as"]]
    assert sorted(read_as) == sorted([
        ("SampleBitext", "deu_Latn-eng_Latn", "deu_Latn", "column", 16),
        ("SampleBitext", "deu_Latn-eng_Latn", "eng_Latn", "column", 16),
        ("SampleBitext", "eng_Latn-fra_Latn", "eng_Latn", "column", 16),
        ("SampleBitext", "eng_Latn-fra_Latn", "fra_Latn", "column", 16),
        # a parallel task: one call per column, named by it
        ("SampleParallelBitext", "spa_Latn", "spa_Latn", "column", 16),
        ("SampleParallelBitext", "rus_Cyrl", "rus_Cyrl", "column", 16),
        ("SampleParallelBitext", "eng_Latn", "eng_Latn", "column", 16),
        ("SampleSTS", "deu", "deu_Latn", "subset", 16), ("SampleSTS", "deu", "deu_Latn", "subset", 16),
        ("SampleSTS", "pcm", "eng_Latn", "subset", 16), ("SampleSTS", "pcm", "eng_Latn", "subset", 16),  # fallback
        # rus-eng holds English in sentence1, Russian in sentence2: the scripts say so, against the subset's order
        ("SampleCrossSTS", "rus-eng", "eng_Latn", "script", 16), ("SampleCrossSTS", "rus-eng", "rus_Cyrl", "script", 16),
        ("SampleCrossSTS", "deu-eng", "deu_Latn", "column", 16), ("SampleCrossSTS", "deu-eng", "eng_Latn", "column", 16)])
    assert read_as.index(("SampleCrossSTS", "rus-eng", "eng_Latn", "script", 16)) < \
        read_as.index(("SampleCrossSTS", "rus-eng", "rus_Cyrl", "script", 16))  # sentence1 is encoded first

    # mteb's nearest neighbours are the stack's, each side read in its own language: the top cosine of every
    # query and its index equal a retrieval computed here; read in English, German gives other cosines.
    model = load_mtllm(exported)
    predictions = json.loads((out / "predictions" / "SampleBitext_predictions.json").read_text())
    for subset, (first, second) in {"deu_Latn-eng_Latn": ("deu_Latn", "eng_Latn"),
                                    "eng_Latn-fra_Latn": ("eng_Latn", "fra_Latn")}.items():
        found = predictions[subset]["test"]["sentence1-sentence2"]
        best, index = _cosines(model, texts(first), first, texts(second), second).max(dim=1)
        assert [hit["corpus_id"] for hit in found] == index.tolist()
        np.testing.assert_allclose([hit["score"] for hit in found], best.numpy(), atol=1e-5)
    english_read = _cosines(model, texts("deu_Latn"), "eng_Latn", texts("eng_Latn"), "eng_Latn").max(dim=1).values
    assert not torch.allclose(english_read, torch.tensor([hit["score"] for hit in predictions["deu_Latn-eng_Latn"]
                                                          ["test"]["sentence1-sentence2"]]), atol=1e-4)
    parallel = json.loads((out / "predictions" / "SampleParallelBitext_predictions.json").read_text())
    best = _cosines(model, texts("rus_Cyrl"), "rus_Cyrl", texts("eng_Latn"), "eng_Latn").max(dim=1).values
    np.testing.assert_allclose([hit["score"] for hit in parallel["parallel"]["test"]["rus_Cyrl-eng_Latn"]],
                               best.numpy(), atol=1e-5)

    # STS: mteb's Spearman is that of the stack's cosines, German read as German.
    rows = {(r["task"], r["subset"]): r["main_score"] for r in summary["rows"]}
    german = texts("deu_Latn")
    cosines = F.cosine_similarity(model.encode(german, lang="deu_Latn"),
                                  model.encode(german[3:] + german[:3], lang="deu_Latn"))
    assert rows["SampleSTS", "deu"] == pytest.approx(spearmanr(cosines.numpy(), STS_SCORES).statistic, abs=1e-6)
    accuracy = (_cosines(model, german, "deu_Latn", texts("eng_Latn"), "eng_Latn").argmax(1) == torch.arange(16))
    assert rows["SampleBitext", "deu_Latn-eng_Latn"] == pytest.approx(accuracy.float().mean().item())
    english = texts("eng_Latn")
    cosines = F.cosine_similarity(model.encode(english, lang="eng_Latn"), model.encode(texts("rus_Cyrl"), lang="rus_Cyrl"))
    assert rows["SampleCrossSTS", "rus-eng"] == pytest.approx(spearmanr(cosines.numpy(), STS_SCORES).statistic, abs=1e-6)
    assert len(rows) == 8 and "| SampleSTS | test | pcm |" in (out / "summary.md").read_text()
    assert "| SampleBitext | test | deu_Latn-eng_Latn |" in capsys.readouterr().out
    assert sorted(path.name for path in (out / "results").rglob("*.json")) == [
        "SampleBitext.json", "SampleCrossSTS.json", "SampleParallelBitext.json", "SampleSTS.json", "model_meta.json"]


def test_mteb_refuses_in_one_line_what_it_cannot_read(exported, tmp_path, capsys, monkeypatch):
    def refused(*args: str) -> str:
        assert main(["mteb", "--model", str(exported), *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mtllm: error: ")
        return err

    def refused_model(model: str) -> str:
        assert main(["mteb", "--model", model, "--tasks", f"{TASKS}:SampleSTS", "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    # Only a stage-1 embedder export, told from its config before any weights load (the folders hold no weights).
    config = json.loads((exported / "config.json").read_text())
    for name, changes, kind in (("task", {"task": {"name": "classification", "labels": ["a", "b"]}}, "stack task model"),
                                ("llm", {"body": "llm"}, "llm model")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        assert f"mtllm mteb reads a stage-1 embedder export (an MT-LLM stack without a task head); this one is a " \
               f"{kind}" in refused_model(str(tmp_path / name))
    assert "not an exported MT-LLM (no config.json of model_type mtllm)" in refused_model(str(tmp_path))
    assert "no language code for pcm-Latn (SampleSTS/pcm); give each a fallback" in refused(
        "--tasks", f"{TASKS}:SampleSTS")
    assert "--tasks SamplePairs: every subset mixes languages in a PairClassification task (deu-eng)" in refused(
        "--tasks", f"{TASKS}:SamplePairs")
    assert "no language code for de (SampleMisnamedParallel/de-en); en (SampleMisnamedParallel/de-en)" in refused(
        "--tasks", f"{TASKS}:SampleMisnamedParallel")
    assert "--languages: 'de' is not a language code (expected ISO 639-3 codes" in refused(
        "--tasks", f"{TASKS}:SampleSTS", "--languages", "de")
    assert "--batch-size 0: expected a positive number" in refused("--tasks", f"{TASKS}:SampleSTS", "--batch-size", "0")
    (tmp_path / "broken.py").write_text("import not_a_module\n")
    assert f"{tmp_path / 'broken.py'} failed (ModuleNotFoundError: No module named 'not_a_module')" in refused(
        "--tasks", f"{tmp_path / 'broken.py'}:Task")
    assert "--fallback pcm-Latn=pcm_Latn: 'pcm_Latn' is not a language code of the MT tokenizer" in refused(
        "--tasks", f"{TASKS}:SampleSTS", "--fallback", "pcm-Latn=pcm_Latn")
    assert "--fallback pcm: expected MTEB_CODE=FLORES_CODE" in refused("--tasks", f"{TASKS}:SampleSTS", "--fallback", "pcm")
    assert "has no mteb task class 'Missing'" in refused("--tasks", f"{TASKS}:Missing")
    assert "SampleSTS has none of them (its subsets: deu, pcm)" in refused(
        "--tasks", f"{TASKS}:SampleSTS", "--languages", "jpn_Jpan")
    assert "not an mteb task (did you mean FloresBitextMining" in refused("--tasks", "FloresBitextMinig")
    # A real mteb task reads the hub, which is out of reach here: one line, before the model encodes anything.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert "--tasks FloresBitextMining: loading its data failed" in refused(
        "--tasks", "FloresBitextMining", "--languages", "deu_Latn")
    assert not (tmp_path / "out").exists()
    # Without the optional package (pip install -e .[mteb]): one line saying how to get it.
    import sys

    for name in [name for name in sys.modules if name.startswith("mteb.")] + ["mtllm_train.mteb_eval"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mteb", None)
    assert "mtllm mteb needs the mteb package: pip install -e .[mteb]" in refused("--tasks", "Tatoeba")


def test_mteb_task_names_languages_and_subsets_are_chosen_as_documented():
    """mteb's metadata only (no data): superseded names, aggregates, --languages, subsets left out."""
    tasks = find_tasks(["STSBenchmark", "CQADupstackRetrieval"])  # superseded by STSBenchmark.v2; an aggregate
    assert [task.metadata.name for task in leaf_tasks(tasks)][:3] == [
        "STSBenchmark", "CQADupstackAndroidRetrieval", "CQADupstackEnglishRetrieval"]
    assert len(leaf_tasks(tasks)) == 13
    # FLORES-200 codes find mteb's macrolanguage codes; bitext keeps English, other tasks only what is named
    assert find_tasks(["Tatoeba"], ["zho_Hans", "arb_Arab"])[0].hf_subsets == ["cmn-eng", "ara-eng"]
    assert sorted(find_tasks(["FloresBitextMining"], ["deu"])[0].hf_subsets) == ["deu_Latn-eng_Latn",
                                                                                  "eng_Latn-deu_Latn"]
    assert find_tasks(["XPQARetrieval"], ["deu_Latn"])[0].hf_subsets == ["deu-deu"]
    retrieval = find_tasks(["XPQARetrieval"])
    notes = keep_readable_subsets(retrieval)
    assert len(retrieval[0].hf_subsets) == 12 and all(len(set(s.split("-"))) == 1 for s in retrieval[0].hf_subsets)
    assert notes == ["XPQARetrieval: left out 24 subset(s) mixing languages (eng-ara, ara-eng, eng-deu, deu-eng, "
                     "...): mteb does not say which of their texts is in which language"]


def test_mteb_codes_of_macrolanguages_are_nllb_codes(exported):
    codes = set(load_mtllm(exported).config.languages)
    assert len(codes) == 202 and all(target in codes for target in MTEB_ALIASES.values())
    assert not {code.replace("-", "_") for code in MTEB_ALIASES} & codes  # each alias is needed

"""The multilingual probe of stage 1: retrieval numbers, the bitext reader, the best checkpoint kept and
exported, early stop, and a step unchanged when the probe is off. (2 ranks: tests/test_distributed.py.)"""

import json

import pytest
import torch

import mtllm_train.model.stack as stack_module
from conftest import read_metrics, train_overrides
from helpers import finish, torchrun
from mtllm_train.__main__ import main
from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import ConfigError, load_config
from mtllm_train.probe import read_bitext, recall_at_1
from mtllm_train.run_folder import RunFolder
from mtllm_train.train import train

BITEXT = "shards/sample/bitext_probe.jsonl"
CODES = {"deu_Latn", "fra_Latn", "spa_Latn", "rus_Cyrl", "zho_Hans", "eng_Latn"}


def test_recall_at_1_is_nearest_neighbour_retrieval_and_a_collapsed_stack_scores_chance():
    generator = torch.Generator().manual_seed(0)
    queries, candidates = torch.randn(12, 8, generator=generator), torch.randn(20, 8, generator=generator)
    targets = torch.randint(0, 20, (12,), generator=generator)
    hits = 0
    for query, target in zip(queries.tolist(), targets.tolist()):  # written out: cosine, then the best candidate
        cosines = [sum(q * c for q, c in zip(query, cand)) / (sum(q * q for q in query) ** 0.5
                                                              * sum(c * c for c in cand) ** 0.5) for cand in candidates.tolist()]
        hits += max(range(len(cosines)), key=cosines.__getitem__) == target
    assert recall_at_1(queries, candidates, targets) == pytest.approx(hits / 12)
    near = candidates[targets] + 0.01 * queries  # queries next to their targets: every one found
    assert recall_at_1(near, candidates, targets) == 1.0
    same = torch.ones(16, 8)  # every sentence of every language mapped to one vector
    assert recall_at_1(same, same, torch.arange(16)) == pytest.approx(1 / 16)


def test_the_bitext_reader_takes_three_formats_and_names_bad_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shipped = read_bitext(BITEXT, CODES)
    assert len(shipped.texts) == 80 and len(shipped.english) == 16 and set(shipped.langs) == CODES - {"eng_Latn"}
    rows = [json.loads(line) for line in open(BITEXT, encoding="utf-8")][:3]
    (tmp_path / "set.tsv").write_text("".join(f"{r['lang']}\t{r['text']}\t{r['english']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "set.parquet")
    for name in ("set.tsv", "set.parquet"):
        assert read_bitext(str(tmp_path / name), CODES).texts == [r["text"] for r in rows]
    cases = {'{"lang": "deu_Latn", "text": "Ein Satz."}': r"bad.jsonl:2: expected a language code, a text and its",
             '{"lang": "de", "text": "Ein Satz.", "english": "A sentence."}': r"bad.jsonl:2: language 'de' is not a",
             '{"lang": "deu_Latn", "text": ': r"bad.jsonl:2: not valid JSON"}
    for line, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(ConfigError, match=message):
            read_bitext(str(tmp_path / "bad.jsonl"), CODES)
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps({**rows[0], "text": t}) + "\n" for t in ("A.", "B.")))
    with pytest.raises(ConfigError, match=r"deu_Latn translates one English sentence twice"):
        read_bitext(str(tmp_path / "twice.jsonl"), CODES)
    # An MT tokenizer without language codes (e5's) reads every language alike: any well-formed code passes.
    assert read_bitext(str(tmp_path / "set.tsv"), set()).langs == [r["lang"] for r in rows]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "lang": "de"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: language 'de' is not a FLORES-200 code"):
        read_bitext(str(tmp_path / "bad.jsonl"), set())
    with pytest.raises(ConfigError, match=r"expected a \.jsonl, \.tsv or \.parquet file"):
        read_bitext("README.md", CODES)


def _cfg(tmp_path, shards, name, **extra):
    return load_config("configs/tiny.yaml", train_overrides(tmp_path, shards, **{
        "run.name": name, "probe.sets": f"[{BITEXT}]", **extra}))


def test_the_probe_logs_per_language_keeps_and_exports_its_best_checkpoint_and_stops_early(tmp_path, train_shards,
                                                                                         capsys):
    summary = train(_cfg(tmp_path, train_shards, "probed", **{"train.steps": 24, "probe.every": 4,
                                                              "checkpoint.every": 4, "checkpoint.keep_last": 2}))
    records = read_metrics(tmp_path / "probed")
    probed = [r for r in records if "probe_stack_mean" in r]
    assert [r["step"] for r in probed] == [4, 8, 12, 16, 20, 24]
    for record in probed:
        assert 0 <= record["probe_stack_x2en_zho_Hans"] <= 1 and 0 <= record["probe_teacher_en2x_deu_Latn"] <= 1
        per_language = [v for k, v in record.items() if k.startswith("probe_stack_") and not k.endswith("_mean")]
        assert len(per_language) == 10 and record["probe_stack_mean"] == pytest.approx(sum(per_language) / 10)
    best = json.loads(RunFolder(tmp_path / "probed").probe_best_file.read_text())
    means = [r["probe_stack_mean"] for r in probed]
    assert best["value"] == max(means) and best["step"] == probed[means.index(max(means))]["step"]
    assert summary["probe_best"]["step"] == best["step"]
    steps = Checkpoints(tmp_path / "probed").steps()
    assert best["step"] in steps and steps[-2:] == [20, 24] and len(steps) <= 3  # keep_last 2 + the best
    assert main(["export", "--run", str(tmp_path / "probed"), "--best", "--out", str(tmp_path / "best")]) == 0
    assert json.loads((tmp_path / "best" / "config.json").read_text())["training"]["step"] == best["step"]
    # The export's own bitext evaluation: the stack's row is what the probe measured at that step; the baselines
    # (the LLM alone, the MT encoder alone) are rows beside it.
    assert main(["evaluate-embedder", "--model", str(tmp_path / "best"), "--bitext", BITEXT,
                 "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    at_best = next(r for r in probed if r["step"] == best["step"])
    stack_row = rows["MT-LLM (X and English by the stack)"]
    assert {lang: scores["x2en"] for lang, scores in stack_row.items() if lang != "mean"} == \
        {key.removeprefix("probe_stack_x2en_"): value for key, value in at_best.items()
         if key.startswith("probe_stack_x2en_")}
    assert len(rows) == 4 and all(0 <= row["mean"] <= 1 for row in rows.values())
    assert "| mean |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "probed" / "loss_curve.png").stat().st_size > 10_000
    # The tiny stack stays at chance on this bitext: a patience of 2 probes stops the run, saved, with a line.
    capsys.readouterr()
    summary = train(_cfg(tmp_path, train_shards, "stopped", **{"train.steps": 40, "probe.every": 2,
                                                               "probe.patience": 2, "checkpoint.every": 100,
                                                               "probe.select": "teacher"}))
    stop = summary["early_stopped"]
    teacher_means = [r["probe_teacher_mean"] for r in read_metrics(tmp_path / "stopped") if "probe_teacher_mean" in r]
    assert summary["probe_best"]["space"] == "teacher" and summary["probe_best"]["value"] == max(teacher_means)
    assert stop < 40 and summary["end_step"] == stop and Checkpoints(tmp_path / "stopped").steps()[-1] == stop
    captured = capsys.readouterr()
    assert f"early stop at step {stop}: the probe's mean R@1 (teacher) has not improved" in captured.out + captured.err
    assert main(["export", "--run", str(tmp_path / "stopped"), "--best", "--step", "4"]) == 2
    assert "give --step or --best, not both" in capsys.readouterr().err


def test_with_the_probe_off_a_step_runs_the_same_forwards(tmp_path, train_shards, monkeypatch):
    calls = []
    real_forward = stack_module.MTLLM.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(sorted(key for key, value in kwargs.items() if value is not None))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(stack_module.MTLLM, "forward", counting_forward)
    train(_cfg(tmp_path, train_shards, "probe_off", **{"train.steps": 4}))
    assert len(calls) == 4 * 2 and all(len(call) == 4 for call in calls)  # 2 micro-batches a step, both views
    calls.clear()
    train(_cfg(tmp_path, train_shards, "probe_on", **{"train.steps": 4, "probe.every": 4}))
    assert len(calls) > 4 * 2 and any(call == ["mt_attention_mask", "mt_input_ids"] for call in calls)


def test_a_bad_probe_set_stops_both_ranks_with_one_line(tmp_path, train_shards):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lang": "deu_Latn", "text": "Ein Satz.", "english": "A sentence."}\n'
                   '{"lang": "xx_Yyyy", "text": "?", "english": "A sentence, again."}\n')
    process = torchrun("train", "--config", "configs/tiny.yaml", *train_overrides(tmp_path, train_shards, **{
        "run.name": "bad", "distributed.backend": "ddp", "probe.every": 2, "probe.sets": f"[{bad}]"}))
    code, output = finish(process, timeout=240)
    assert code != 0 and output.count("mtllm: error: probe.sets: ") == 2, output[-3000:]  # one line per rank
    assert output.count("bad.jsonl:2: language 'xx_Yyyy' is not a flores language") == 2
    assert "mtllm_train/" not in output  # no traceback of ours (torchrun prints its own summary of the exit codes)


def test_a_flores_release_folder_becomes_a_probe_set(tmp_path, capsys):
    dev = tmp_path / "flores200_dataset" / "dev"
    dev.mkdir(parents=True)
    (dev / "eng_Latn.dev").write_text("The river flows.\nThe bridge is old.\nIt rained.\n")
    (dev / "deu_Latn.dev").write_text("Der Fluss fließt.\nDie Brücke ist alt.\nEs regnete.\n")
    (dev / "rus_Cyrl.dev").write_text("Река течёт.\nМост старый.\nШёл дождь.\n")
    out = tmp_path / "probe.jsonl"
    assert main(["probe-set", "--flores", str(tmp_path / "flores200_dataset"), "--out", str(out),
                 "--langs", "deu_Latn,rus_Cyrl", "--sentences", "2"]) == 0
    bitext = read_bitext(str(out), CODES)
    assert bitext.langs == ["deu_Latn"] * 2 + ["rus_Cyrl"] * 2 and bitext.english == ["The river flows.",
                                                                                       "The bridge is old."]
    assert bitext.texts[3] == "Мост старый." and bitext.english_index == [0, 1, 0, 1]
    assert main(["probe-set", "--flores", str(tmp_path / "flores200_dataset"), "--out", str(out),
                 "--langs", "fra_Latn"]) == 2
    assert "no fra_Latn.dev in" in capsys.readouterr().err


def test_flores_from_the_hub_through_the_datasets_package(monkeypatch):
    """hf://ORG/DATASET:SPLIT?langs=...: each language's configuration, line-aligned with English's, read with
    `datasets` (here a stand-in that serves FLORES-shaped rows: the hub is not reachable from the tests)."""
    import sys
    import types

    from mtllm_train.config import ConfigError

    served = {"eng_Latn": ["One.", "Two.", "Three."], "deu_Latn": ["Eins.", "Zwei.", "Drei."],
              "swh_Latn": ["Moja.", "Mbili.", "Tatu."]}
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"id": k, "text": text} for k, text in enumerate(served[config])]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    bitext = read_bitext("hf://openlanguagedata/flores_plus:dev?langs=deu_Latn,swh_Latn&sentences=2", set(served))
    assert bitext.name == "flores_plus_dev" and bitext.english == ["One.", "Two."]
    assert list(zip(bitext.langs, bitext.texts, bitext.english_index)) == [
        ("deu_Latn", "Eins.", 0), ("deu_Latn", "Zwei.", 1), ("swh_Latn", "Moja.", 0), ("swh_Latn", "Mbili.", 1)]
    assert calls[0] == ("openlanguagedata/flores_plus", "eng_Latn", "dev")
    with pytest.raises(ConfigError, match=r"expected hf://ORG/DATASET:SPLIT\?langs=L1,L2"):
        read_bitext("hf://openlanguagedata/flores_plus:dev", set(served))
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.setattr("builtins.__import__", _no_datasets(__import__))
    with pytest.raises(ConfigError, match=r"needs the `datasets` package"):
        read_bitext("hf://openlanguagedata/flores_plus:dev?langs=deu_Latn", set(served))


def _no_datasets(real_import):
    def importing(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)
    return importing

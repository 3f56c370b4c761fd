"""An export that checks itself at every load: probe outputs recorded at export, recomputed and compared by the
project's loader, transformers' AutoModel, sentence-transformers and `mtllm predict`; `mtllm verify`; strict and
off modes; exports made before the check."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtllm_train.portable.modeling_mtllm as modeling_mtllm
from conftest import ROOT, train_overrides
from mtllm_train.__main__ import main
from mtllm_train.config import load_config
from mtllm_train.export import export_run, load_mtllm
from mtllm_train.portable.guard import GUARD_FILE, PROBES, TOLERANCE, ExportDriftWarning
from mtllm_train.portable.tokens import InputError
from mtllm_train.train import train


@pytest.fixture(scope="module")
def exported(tmp_path_factory, train_shards):
    root = tmp_path_factory.mktemp("guard")
    train(load_config("configs/tiny.yaml", train_overrides(root, train_shards, **{"run.name": "s1", "train.steps": 8})))
    return export_run(str(root / "s1"), str(root / "model"))


@pytest.fixture
def drifted(exported, tmp_path):
    """The export with its largest LoRA B matrix scaled by 1.01, as a changed library might compute it."""
    folder = tmp_path / "drifted"
    shutil.copytree(exported, folder)
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    name = max((key for key in weights if "lora_B" in key), key=lambda key: weights[key].norm())
    weights[name] = weights[name] * 1.01
    save_file(weights, str(folder / "adapter" / "adapter_model.safetensors"))
    return folder


def _mtllm(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "mtllm_train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_an_export_records_its_probes_and_versions_and_a_fresh_load_is_silent(exported, capsys):
    config = json.loads((exported / "config.json").read_text())
    assert config["export_format"] == 3 and config["probe_record"]["precision"] == "float32"
    assert [probe["lang"] for probe in config["probe_record"]["probes"]] == [lang for lang, _ in PROBES]
    assert {"torch", "transformers", "peft", "tokenizers", "mtllm-train"} <= config["versions"].keys()
    assert config["training"]["trained_with"]["torch"] == torch.__version__  # the checkpoint's own record
    assert load_file(str(exported / GUARD_FILE))["outputs"].shape == (len(PROBES), 64)
    card = (exported / "README.md").read_text()
    assert f"| torch | {torch.__version__} | {torch.__version__} |" in card
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportDriftWarning)
        load_mtllm(exported)
    assert main(["verify", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "ok: every probe within the tolerance" in out and out.count(" ok\n") == len(PROBES)


def test_a_drifted_export_is_reported_by_every_entry_point(drifted, capsys):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    named = r"probe \w{3}_\w{4} '.*' deviates by \d\.\d\de-\d\d \(relative L2; tolerance 1e-05\)"
    with pytest.warns(ExportDriftWarning, match=named):
        load_mtllm(drifted)
    # The export's own copy of the code raises its own copy of the warning class: a UserWarning.
    with pytest.warns(UserWarning, match=named):
        AutoModel.from_pretrained(str(drifted), trust_remote_code=True)
    with pytest.warns(UserWarning, match=named):
        SentenceTransformer(str(drifted), trust_remote_code=True)
    predicted = _mtllm("predict", "--model", str(drifted), "Ein Satz.")
    assert predicted.returncode == 0 and "deviates by" in predicted.stderr and '"vector"' in predicted.stdout
    assert main(["verify", str(drifted)]) == 1
    assert "DRIFT" in capsys.readouterr().out
    # Strict loading refuses, with one line; off skips the check and says so once.
    with pytest.raises(InputError, match=named):
        load_mtllm(drifted, guard="strict")
    with pytest.raises(ValueError, match=named):  # the export's own InputError, through transformers
        AutoModel.from_pretrained(str(drifted), trust_remote_code=True, guard="strict")
    strict = _mtllm("predict", "--model", str(drifted), "Ein Satz.", env={"MTLLM_GUARD": "strict"})
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1 and "deviates by" in strict.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_mtllm(drifted, guard="off")
    messages = [str(w.message) for w in caught if issubclass(w.category, ExportDriftWarning)]
    assert len(messages) == 1 and "load check is off" in messages[0]
    with pytest.raises(InputError, match=r"guard 'loud': expected one of warn, strict, off"):
        load_mtllm(drifted, guard="loud")


def test_attention_fallen_back_to_causal_fires_the_guard(exported, monkeypatch):
    """llm2vec's failure: the bidirectional patch silently not applied by a newer transformers."""
    monkeypatch.setattr(modeling_mtllm, "make_bidirectional", lambda model: None)
    with pytest.raises(InputError, match=r"deviates by"):
        load_mtllm(exported, guard="strict")


def test_an_export_made_before_the_check_loads_with_one_notice_and_an_unknown_format_is_one_line(exported,
                                                                                                  tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    (old / GUARD_FILE).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["probe_record"], config["versions"]
    (old / "config.json").write_text(json.dumps({**config, "export_format": 2}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_mtllm(old)
    messages = [str(w.message) for w in caught if issubclass(w.category, ExportDriftWarning)]
    assert len(messages) == 1 and "records no reference outputs (export format 2" in messages[0]
    assert model.encode("Ein Satz.", lang="deu_Latn").shape == (64,)
    assert main(["verify", str(old)]) == 1
    (old / "config.json").write_text(json.dumps({**config, "export_format": 9}))
    with pytest.raises(InputError, match=r"export format 9 is not one this code reads \(1 to 3\)"):
        load_mtllm(old)


def test_the_float32_tolerance_sits_between_rounding_and_a_one_percent_adapter_change(exported, drifted):
    """What the tolerance rests on, measured here: a float32 reload with other batching moves the probes by
    rounding only (~1e-7), loading in bfloat16 by ~4e-3 (under bfloat16's tolerance), a 1% change of one LoRA
    matrix by more than float32's."""
    from mtllm_train.portable.guard import compare, probe_set

    model = load_mtllm(exported)
    recorded = load_file(str(exported / GUARD_FILE))["outputs"]
    probes = probe_set(model.config)
    batched = torch.cat([model.encode([p["text"] for p in probes if p["lang"] == lang], lang=lang)
                         for lang in dict.fromkeys(p["lang"] for p in probes)])
    rounding = ((batched - recorded).norm(dim=-1) / recorded.norm(dim=-1)).max().item()
    assert rounding < TOLERANCE["float32"] / 20
    in_bf16 = compare(load_mtllm(exported, dtype=torch.bfloat16, guard="off"), exported)
    assert in_bf16.tolerance == TOLERANCE["bfloat16"] and TOLERANCE["float32"] < max(in_bf16.deviations) < \
        TOLERANCE["bfloat16"] / 5
    changed = compare(load_mtllm(drifted, guard="off"), drifted)
    assert max(changed.deviations) > 2 * TOLERANCE["float32"]

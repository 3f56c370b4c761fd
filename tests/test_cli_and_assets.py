import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtllm_train.model.tiny_tokenizers import build_tiny_tokenizers


def test_help_lists_commands():
    from mtllm_train.__main__ import build_parser

    out = subprocess.run([sys.executable, "-m", "mtllm_train", "--help"], capture_output=True, text=True, check=True)
    commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    assert len(commands) >= 12 and out.stdout.startswith("usage: mtllm")
    for name, parser in commands.items():  # every command, with its one-line description
        words = parser.description.split()[:3]
        assert re.search(rf"^ +{name}\s+" + r"\s+".join(map(re.escape, words)), out.stdout, re.M | re.I), name


def test_console_script_is_installed():
    out = subprocess.run(["mtllm", "--help"], capture_output=True, text=True, check=True,
                         env={"PATH": f"{sys.prefix}/bin"})
    assert "usage: mtllm" in out.stdout


def test_committed_tiny_tokenizers_rebuild_identically(tmp_path):
    llm_dir, mt_dir = build_tiny_tokenizers("shards/sample/enwiki_sample.jsonl", tmp_path)
    for built, committed in ((llm_dir, "configs/tiny/llm_tokenizer"), (mt_dir, "configs/tiny/mt_tokenizer")):
        assert sorted(p.name for p in built.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        assert (built / "tokenizer.json").read_bytes() == (Path(committed) / "tokenizer.json").read_bytes()
        # transformers records whether the hub was offline when saving; that is not part of the tokenizer.
        built_config, committed_config = (json.loads((Path(d) / "tokenizer_config.json").read_text())
                                          for d in (built, committed))
        built_config.pop("local_files_only"), committed_config.pop("local_files_only")
        assert built_config == committed_config


def test_tiny_mt_tokenizer_knows_nllb_language_codes():
    from mtllm_train.model.tokenizers import load_tokenizer

    mt_tok = load_tokenizer("configs/tiny/mt_tokenizer", "model.mt_tokenizer")
    mt_tok.src_lang = "ell_Grek"
    ids = mt_tok("Hello").input_ids
    assert mt_tok.convert_ids_to_tokens(ids)[0] == "ell_Grek" and ids[-1] == mt_tok.eos_token_id
    assert mt_tok.convert_tokens_to_ids("ell_Latn") == mt_tok.unk_token_id


def test_shards_build_and_inspect_commands(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    with open("shards/sample/enwiki_sample.jsonl", encoding="utf-8") as lines:
        corpus.write_text("".join(next(lines) for _ in range(12)))
    build = [sys.executable, "-m", "mtllm_train", "shards", "build", "--input", str(corpus), "--out",
             str(tmp_path / "out"), "--llm-tokenizer", "configs/tiny/llm_tokenizer", "--mt-tokenizer",
             "configs/tiny/mt_tokenizer", "--max-length", "64", "--shard-size", "5"]
    out = subprocess.run(build, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "3 shards (3 built, 0 kept)" in out.stdout and "12 samples" in out.stdout
    inspect = subprocess.run([sys.executable, "-m", "mtllm_train", "shards", "inspect", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert inspect.returncode == 0 and "checksums: all match" in inspect.stdout
    (tmp_path / "out" / "shard-000001.tar").write_bytes(b"garbage")
    inspect = subprocess.run([sys.executable, "-m", "mtllm_train", "shards", "inspect", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert inspect.returncode == 1 and "CHECKSUM MISMATCH shard-000001.tar" in inspect.stdout
    bad = subprocess.run(build[:-4] + ["--mt-lang", "ell_Latn"], capture_output=True, text=True)
    assert bad.returncode == 2 and "language code 'ell_Latn' is not in the MT tokenizer" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_help_version_suggestions_and_the_override_hint(capsys):
    from mtllm_train.__main__ import main

    for argv, stream, expected in (
            (["train", "--help"], "out", ["examples:", "mtllm train --config configs/tiny.yaml", "Sections: run, model",
                                          "mtllm config --config FILE"]),
            (["export", "--help"], "out", ["examples:", "mtllm export --run runs/tiny --out exports/tiny"]),
            (["--version"], "out", ["mtllm-train 0.1.0"]),
            (["trian"], "err", ["invalid choice: 'trian'", "did you mean 'train'?"]),
            (["train", "--config", "configs/tiny.yaml", "--train.steps=5"], "err",
             ["settings are overrides written without dashes, key.sub=value (e.g. train.steps=5)"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(getattr(capsys.readouterr(), stream).split())  # help text is wrapped
        assert all(part in text for part in expected), (argv, text)
    assert main(["config", "--config", "configs/tiny.yaml", "train.step=5"]) == 2
    assert "unknown config key 'train.step'; did you mean 'train.steps'?" in capsys.readouterr().err
    # The deepspeed launcher's --local_rank comes before the command.
    assert main(["--local_rank=1", "config", "--config", "configs/tiny.yaml", "--run-dir"]) == 0
    assert capsys.readouterr().out.strip() == "runs/tiny"


def test_config_prints_only_the_sections_the_run_uses(capsys):
    from mtllm_train.__main__ import main

    assert main(["config", "--config", "configs/tiny.yaml"]) == 0
    stage1 = yaml.safe_load(capsys.readouterr().out)
    assert "task" not in stage1 and stage1["train"]["steps"] > 0
    assert main(["config", "--config", "configs/stage2/nusax_llm.yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["task"]["name"] == "sentiment"

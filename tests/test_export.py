"""Export of a stage-1 run: safe destination handling, one format loadable by load_mtllm, transformers' AutoModel
and sentence-transformers with the same vectors as the in-run stack, the model card, merging, `mtllm predict`.
(Stage-2 exports: tests/test_stage2.py.)"""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

import mtllm_train.export as export_module
from conftest import preempt_at, trained_weights, train_overrides
from mtllm_train.__main__ import main
from mtllm_train.config import ConfigError, load_config
from mtllm_train.export import export_run, load_mtllm, load_trained_stack
from mtllm_train.portable.tokens import pad_id, pad_right
from mtllm_train.train import train

TEXTS = ["The old town lies by the river.", "Water boils at a lower temperature in the mountains.",
         "She wrote three novels."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_shards):
    root = tmp_path_factory.mktemp("export")
    train(load_config("configs/tiny.yaml", train_overrides(root, train_shards, **{"run.name": "s1", "train.steps": 8})))
    return root / "s1"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    return export_run(str(run_dir), str(tmp_path_factory.mktemp("out") / "model"))


def _in_run_vectors(run_dir, tokenizer, texts=TEXTS):
    stack, _, _ = load_trained_stack(run_dir)
    ids, mask = pad_right(tokenizer(texts)["input_ids"], pad_id(tokenizer))
    with torch.no_grad():
        return stack.student_pooled(ids, mask)


def test_every_loading_route_gives_the_in_run_vectors(run_dir, exported):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model = load_mtllm(exported)
    expected = _in_run_vectors(run_dir, model.tokenizer)
    torch.testing.assert_close(model.encode(TEXTS), expected, rtol=0, atol=0)
    auto = AutoModel.from_pretrained(str(exported), trust_remote_code=True)
    assert type(auto).__name__ == "MTLLMModel" and type(auto) is not type(model)  # the export's own code
    torch.testing.assert_close(auto.encode(TEXTS), expected, rtol=0, atol=0)
    sentence_model = SentenceTransformer(str(exported), trust_remote_code=True)
    torch.testing.assert_close(sentence_model.encode(TEXTS, convert_to_tensor=True), expected, rtol=1e-5, atol=1e-6)
    # Another language is another input to the MT encoder.
    assert not torch.equal(model.encode(TEXTS, lang="deu_Latn"), expected)


def test_encode_takes_one_string_normalizes_and_gives_numpy(exported):
    model = load_mtllm(exported)
    one = model.encode(TEXTS[0])
    assert one.shape == (64,)
    torch.testing.assert_close(one, model.encode(TEXTS)[0], rtol=1e-5, atol=1e-6)  # unpadded vs padded batch
    unit = model.encode(TEXTS, normalize=True, convert_to_numpy=True)
    assert unit.shape == (3, 64) and abs(float((unit ** 2).sum(1).max()) - 1.0) < 1e-5
    assert model.encode_teacher(TEXTS).shape == (3, 64)


def test_device_and_dtype_are_honoured(exported):
    model = load_mtllm(exported, device="cpu", dtype=torch.bfloat16)
    assert model.projection.weight.dtype == torch.bfloat16 and model.device.type == "cpu"
    full = load_mtllm(exported).encode(TEXTS)
    half = model.encode(TEXTS)
    assert half.dtype == torch.float32  # pooling is fp32
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.98


def test_manifest_and_model_card_say_how_to_rebuild_and_what_was_trained(run_dir, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "mtllm" and config["body"] == "stack" and config["task"] is None
    assert config["auto_map"] == {"AutoConfig": "configuration_mtllm.MTLLMConfig", "AutoModel": "modeling_mtllm.MTLLMModel"}
    assert config["bidirectional"] == load_config(run_dir / "config.yaml").model.bidirectional
    assert config["mt_encoder"] == "./frozen/mt_encoder" and config["llm"] == "./frozen/llm"  # inline models' weights
    assert config["view_max_length"] == {"mt": 48, "llm": 48} and "deu_Latn" in config["languages"]
    training = config["training"]
    assert training["step"] == 8 and training["sequences_seen"] == 64
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert training["final_loss"] == metrics[-1]["loss"] and training["final_fvu"] == metrics[-1]["fvu"]
    card = (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "deu" in front["language"]
    assert "sentence-transformers" in front["tags"] and front["pipeline_tag"] == "feature-extraction"
    assert "64 sequences seen" in card and "trust_remote_code=True" in card
    adapter = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "./frozen/llm" and adapter["task_type"] == "FEATURE_EXTRACTION"
    assert "load that whole folder" in (exported / "adapter" / "README.md").read_text()  # not peft's template


def test_export_refuses_a_foreign_folder_and_replaces_only_an_earlier_export(run_dir, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", "--run", str(run_dir), "--out", str(foreign)]) == 2
    assert "exists and is not an MT-LLM export" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert main(["export", "--run", str(run_dir), "--out", str(foreign), "--force"]) == 2  # force is no key to it
    target = tmp_path / "model"
    assert main(["export", "--run", str(run_dir), "--out", str(target)]) == 0
    assert main(["export", "--run", str(run_dir), "--out", str(target)]) == 2
    assert "holds an earlier export; add --force" in capsys.readouterr().err
    (target / "marker").write_text("")
    assert main(["export", "--run", str(run_dir), "--out", str(target), "--force"]) == 0
    assert not (target / "marker").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "model"]


def test_an_interrupted_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    real = export_module.model_card

    def crash(config):
        real(config)
        raise KeyboardInterrupt  # e.g. Ctrl-C while writing the last file

    monkeypatch.setattr(export_module, "model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        export_run(str(run_dir), str(tmp_path / "model"))
    assert list(tmp_path.iterdir()) == []


def test_an_export_killed_mid_way_is_cleaned_up_by_the_next_and_a_symlinked_out_is_one_line(run_dir, exported,
                                                                                            tmp_path):
    import shutil
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # the pid of an export the OOM killer ended
    (tmp_path / f".model.partial-{dead.pid}" / "llm").mkdir(parents=True)  # its half-written export
    shutil.copytree(exported, tmp_path / f".other.old-{dead.pid}")  # --force killed between its two renames
    (tmp_path / ".model.partial-notmine").mkdir()  # not a name an export gives: left alone
    export_run(str(run_dir), str(tmp_path / "model"))
    assert not (tmp_path / f".model.partial-{dead.pid}").exists()
    # The earlier export that --force had moved aside is back in place, so a plain export refuses to replace it.
    with pytest.raises(ConfigError, match=r"other: holds an earlier export; add --force"):
        export_run(str(run_dir), str(tmp_path / "other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial-notmine", "model", "other"]
    (tmp_path / "link").symlink_to(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"link: a symbolic link; give the folder it points to"):
        export_run(str(run_dir), str(tmp_path / "link"), force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "model" / "config.json").is_file()


def test_merged_export_needs_no_peft_and_gives_the_same_vectors(run_dir, exported, tmp_path):
    merged = export_run(str(run_dir), str(tmp_path / "merged"), merge=True)
    assert not (merged / "adapter").exists() and json.loads((merged / "config.json").read_text())["merged"]
    with safe_open(str(merged / "llm" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    model = load_mtllm(merged)
    assert "Peft" not in type(model.llm).__name__
    reference = load_mtllm(exported).encode(TEXTS)
    assert torch.nn.functional.cosine_similarity(model.encode(TEXTS), reference).min() > 0.99


def test_predict_prints_vectors_and_user_errors_are_one_line(exported, tmp_path, capsys):
    assert main(["predict", "--model", str(exported), "--lang", "deu_Latn", "Ein Satz.", "Noch einer."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])["vector"]) == 64
    expected = load_mtllm(exported).encode(["Ein Satz."], lang="deu_Latn")[0]
    torch.testing.assert_close(torch.tensor(json.loads(lines[0])["vector"]), expected, rtol=0, atol=1e-6)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "Ein Satz."}\n')
    assert main(["predict", "--model", str(exported), "--lang", "deu_Latn", "--input", str(inputs)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == lines[0]
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "list.jsonl").write_text('["Ein Satz."]\n')
    (tmp_path / "no_text.jsonl").write_text('{"txt": "Ein Satz."}\n')
    for model, args, message in (
            (exported, ["--lang", "xyz_Latn", "x"], "language code 'xyz_Latn' is not in the MT tokenizer"),
            # A vocabulary piece is not a language: "de" was accepted and started every text with the word "de".
            (exported, ["--lang", "de", "x"], "language code 'de' is not in the MT tokenizer '"),
            (exported, ["--lang", "deu_latn", "x"], "did you mean deu_Latn?"),
            (exported, [], "give texts or --input FILE.jsonl"),
            (exported, ["--input", str(tmp_path / "empty.jsonl")], "no inputs (one JSON object per line)"),
            (exported, ["--input", str(tmp_path / "list.jsonl")], "list.jsonl:1: expected a JSON object"),
            (exported, ["--input", str(tmp_path / "no_text.jsonl")], "no_text.jsonl:1: no 'text' field to embed"),
            (tmp_path / "nowhere", ["x"], "not a local folder, and not found on the model hub")):
        assert main(["predict", "--model", str(model), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError, match="not an exported MT-LLM"):
        load_mtllm(tmp_path)


def test_a_4bit_run_resumes_bit_identically_and_exports_with_its_own_quantization(tmp_path, train_shards,
                                                                                   monkeypatch):
    # Checkpoints hold the trainable weights only: a 4-bit base's quantization state (absmax, quant_map, packed
    # quant_state) is frozen, and its packed sizes differ between loads (saving it made NF4 runs unloadable).
    import bitsandbytes.nn.modules

    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for a bf16 kernel on its first no-grad eval
    # forward (the teacher's) and unpacks it whenever a state dict is taken (a checkpoint): the teacher's numerics
    # then depend on when checkpoints were saved. Off here, so that resume can be compared bit for bit (GPUs have
    # no such path).
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)

    def cfg(name):
        return load_config("configs/tiny.yaml", train_overrides(tmp_path, train_shards, **{
            "run.name": name, "train.steps": 4, "checkpoint.every": 2, "model.lora.dropout": 0.0,
            "model.quantization": "nf4", "model.quant_double": False, "model.quant_compute_dtype": "float32"}))

    train(cfg("straight"))
    with monkeypatch.context() as patch:
        preempt_at(patch, 2)
        assert train(cfg("resumed"))["preempted"]
    train(cfg("resumed"))
    straight, resumed = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The export rebuilds the 4-bit LLM as the run loaded it: double quantization off and fp32 compute here
    # (exports once always used double quantization and bf16 compute: other vectors).
    model = load_mtllm(export_run(str(tmp_path / "resumed"), str(tmp_path / "export")))
    assert (model.config.quant_double, model.config.quant_compute_dtype) == (False, "float32")
    torch.testing.assert_close(model.encode(TEXTS), _in_run_vectors(tmp_path / "resumed", model.tokenizer),
                               rtol=1e-5, atol=1e-6)
    from mtllm_train.portable.tokens import InputError

    with pytest.raises(InputError, match=r"a nf4 export computes in its compute dtype \(float32\); load it without"):
        load_mtllm(tmp_path / "export", dtype=torch.bfloat16)  # casting 4-bit weights broke with a raw error

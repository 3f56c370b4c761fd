import subprocess
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModel, AutoTokenizer

TINY = {"vocab_size": 2000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_prepare_llm2vec_merges_adapters_in_order(tmp_path):
    torch.manual_seed(0)
    base = AutoModel.from_config(AutoConfig.for_model("llama", **TINY))
    base.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained("configs/tiny/llm_tokenizer").save_pretrained(tmp_path / "base")
    adapters = []
    for name, targets in (("mntp", ["q_proj", "v_proj"]), ("simcse", ["k_proj", "down_proj"])):
        # init_lora_weights=False: non-zero B matrices, so each adapter changes the model.
        lora = get_peft_model(AutoModel.from_pretrained(tmp_path / "base"),
                              LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        lora.save_pretrained(tmp_path / name)
        adapters += ["--adapter", str(tmp_path / name)]
    done = subprocess.run([sys.executable, "-m", "mtllm_train", "prepare-llm2vec", "--base", str(tmp_path / "base"),
                           *adapters, "--dtype", "float32", "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    expected = AutoModel.from_pretrained(tmp_path / "base")
    for name in ("mntp", "simcse"):
        expected = PeftModel.from_pretrained(expected, tmp_path / name).merge_and_unload()
    merged = AutoModel.from_pretrained(tmp_path / "merged")
    ids = torch.randint(5, 2000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, expected(input_ids=ids).last_hidden_state)
        plain = AutoModel.from_pretrained(tmp_path / "base")(input_ids=ids).last_hidden_state
    assert (merged(input_ids=ids).last_hidden_state - plain).abs().max() > 1e-3
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("Hello").input_ids[0] == 1


def test_prepare_llm2vec_bad_adapter_is_named(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mtllm_train", "prepare-llm2vec", "--base", "./missing-base",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "--base: './missing-base' is not a folder" in done.stderr

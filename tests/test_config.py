import pytest

from mtllm_train.config import Config, ConfigError, dump_config, load_config


def test_tiny_config_loads_with_types(tiny_cfg):
    assert isinstance(tiny_cfg, Config)
    assert tiny_cfg.model.mt_encoder["model_type"] == "m2m_100"
    assert tiny_cfg.model.lora.r == 8 and tiny_cfg.optim.lr == pytest.approx(3e-3)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["run.name=try1", "train.steps=200", "distributed.backend=fsdp",
                                            "model.lora.target_modules=[q_proj, v_proj]", "optim.warmup=5",
                                            "model.bidirectional=false", "optim.lr=1", "optim.min_lr_ratio=1e-1"])
    assert (cfg.run.name, cfg.train.steps, cfg.distributed.backend) == ("try1", 200, "fsdp")
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.warmup == 5 and isinstance(cfg.optim.warmup, int)
    assert cfg.model.bidirectional is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr_ratio == 0.1  # YAML 1.1 reads 1e-1 as a string; a float field takes it as a number


def test_inline_model_keys_can_be_overridden():
    cfg = load_config("configs/tiny.yaml", ["model.llm.num_hidden_layers=3"])
    assert cfg.model.llm["num_hidden_layers"] == 3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.steps=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", r"unknown config key 'train.stepz'; did you mean 'train.steps'\? "
                      r"expected one of: global_batch_size, grad_clip, init_from, init_step, steps"),
    ("trian.steps=3", r"unknown config key 'trian'"),
    ("train.steps=many", r"train.steps: expected an integer, got 'many'"),
    ("train.steps=1.5", r"train.steps: expected an integer, got 1.5"),
    ("optim.lr=fast", r"optim.lr: expected a number, got 'fast'"),
    ("model.bidirectional=3", r"model.bidirectional: expected true/false, got 3"),
    ("distributed.backend=horovod", r"distributed.backend: expected one of none, ddp, fsdp, deepspeed, got 'horovod'"),
    ("model.pooling=max", r"model.pooling: expected one of mean, eos, bos, got 'max'"),
    ("optim.warmup=1.5", r"optim.warmup: expected a step count"),
    ("checkpoint.keep_last=1", r"checkpoint.keep_last: expected at least 2"),
    ("train.steps=0", r"train.steps: expected a positive value, got 0"),
    ("run.name.x=1", r"'run.name' is 'tiny', not a mapping"),
    ("justakey", r"override 'justakey': expected key.sub=value"),
])
def test_bad_values_give_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("configs/tiny.yaml", [override])
    assert "\n" not in str(info.value)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load_config(bad)


def test_models_are_required():
    with pytest.raises(ConfigError, match=r"model.mt_encoder: required"):
        load_config(None)


def test_base_configs_merge_key_by_key_and_replace_inline_models_whole(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, seed: 3}\nmodel: {llm: {model_type: llama, hidden_size: 64}, "
                                        "mt_encoder: enc, pooling: eos}\n")
    (tmp_path / "row.yaml").write_text("base: base.yaml\nrun: {name: row}\nmodel: {llm: {model_type: gpt2}}\n")
    cfg = load_config(tmp_path / "row.yaml")
    assert (cfg.run.name, cfg.run.seed, cfg.model.pooling) == ("row", 3, "eos")
    assert cfg.model.llm == {"model_type": "gpt2"}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"loop.yaml' is its own base"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml' does not exist"):
        load_config(tmp_path / "orphan.yaml")

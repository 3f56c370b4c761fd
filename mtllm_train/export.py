"""`mtllm export`: a trained run -> a self-contained MT-LLM folder that people can use.

One format for stage 1 (an embedder) and stage 2 (a task model: body + head + label names):

DIR/
    config.json                 everything needed to rebuild the model (model_type "mtllm", auto_map to the code
                                below): frozen parts' sources, bidirectional, pooling, quantization, dtype, max length
                                per view, language codes, task; plus the training facts (run, steps, sequences seen,
                                final loss / FVU, stage-2 scores)
    configuration_mtllm.py ...  the model's code (mtllm_train/portable, copied): loads without mtllm-train
    adapter/                    the LoRA adapter in peft's format (base model and task type named), or
    llm/                        with --merge: the LLM with the LoRA merged in (bfloat16)
    frozen/mt_encoder, frozen/llm   frozen weights of models built from inline configs (no hub id to point to)
    projection.safetensors      U (the stack)          head.safetensors   the task head (task models)
    tokenizer files             the tokenizer the model reads; tokenizers/llm: the teacher's (the stack)
    modules.json, 1_Pooling/    sentence-transformers (embedders)
    guard.safetensors           the outputs of a few probe texts, computed by the export itself once written;
                                every load recomputes and compares them (portable/guard.py)
    README.md                   the model card

Export never destroys what it did not write: a non-empty folder that is not an earlier export is refused,
`force` replaces an earlier export only, and the export is built beside the destination and renamed into place.

    >>> from mtllm_train.export import load_mtllm
    >>> model = load_mtllm("runs/tiny/export")
    >>> vectors = model.encode(["Ein Satz auf Deutsch."], lang="deu_Latn")
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, ModelConfig, stored_quantization
from mtllm_train.model_card import model_card
from mtllm_train.model.loading import build_llm, load_model
from mtllm_train.model.stack import MTLLM, add_lora, build_stack
from mtllm_train.model.tokenizers import view_tokenizer
from mtllm_train.portable import configuration_mtllm, guard
from mtllm_train.files import pid_alive
from mtllm_train.portable.configuration_mtllm import FORMAT_VERSION, MTLLMConfig
from mtllm_train.portable.format import (ADAPTER_DIR, FROZEN_DIR, HEAD_FILE, MERGED_LLM_DIR, PROJECTION_FILE,
                                         TEACHER_TOKENIZER_DIR, task_shape)
from mtllm_train.portable.modeling_mtllm import MTLLMModel
from mtllm_train.portable.tokens import ENGLISH, language_codes
from mtllm_train.run_folder import RunFolder

PORTABLE_CODE = Path(configuration_mtllm.__file__).parent
ST_POOLING = {"mean": "mean", "eos": "lasttoken", "bos": "cls"}  # our pooling -> sentence-transformers' mode
ADAPTER_README = """# The LoRA adapter of an MT-LLM export

This folder is one part of the MT-LLM exported one level up: load that whole folder (its README.md says how).
It rebuilds the frozen parts around this adapter (the MT encoder, the projection, bidirectional attention where the
run trained with it); peft loading this adapter alone onto the base LLM gives neither.
"""


def load_trained_stack(run_dir: Path, step: int | None = None) -> tuple[MTLLM, ModelConfig, dict]:
    """A stage-1 run's stack with the trainable weights of a checkpoint, in this (single) process."""
    cfg = RunFolder(run_dir).settings()
    stack = build_stack(cfg.model)
    meta = Checkpoints(run_dir).load_trainable(stack, step)
    return stack.eval(), cfg.model, meta


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MTLLMConfig.model_type
    except (OSError, ValueError):
        return False


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.is_symlink():
        raise ConfigError(f"--out {out_dir}: a symbolic link; give the folder it points to ({out_dir.resolve()}): "
                          f"an export replaces folders it wrote, not links")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not out_dir.is_dir() or not _is_export(out_dir):
        raise ConfigError(f"--out {out_dir}: exists and is not an MT-LLM export; export writes only into a new or "
                          f"empty folder (it never deletes what it did not write)")
    if not force:
        raise ConfigError(f"--out {out_dir}: holds an earlier export; add --force to replace it")


def _recover_interrupted_exports(out_dir: Path) -> None:
    """What an export killed mid-way left beside --out (hidden folders named by its pid, now gone): a partial
    export is removed; an earlier export moved aside by --force goes back into place if nothing took it (the
    kill came between the two renames), else it is removed."""
    for stale in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, pid = stale.name.removeprefix(f".{out_dir.name}.").rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            stale.rename(out_dir)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _frozen_source(spec: str | dict, name: str, module_fn, folder: Path, changed: bool = False) -> str:
    """Where the export's loader finds a frozen part: the hub id / path it was trained from, or, for a model
    built from an inline config or `changed` after loading (a stage-1 LoRA merged in), its weights saved into
    the export (nothing else could rebuild them)."""
    if isinstance(spec, str) and not changed:
        return spec
    module_fn().save_pretrained(str(folder / FROZEN_DIR / name))
    return f"./{FROZEN_DIR}/{name}"


def _training_facts(run: RunFolder, cfg: Config, meta: dict, identity: dict | None) -> dict:
    records = run.metrics(up_to_step=meta["step"])
    facts = {"run": run.name, "step": meta["step"], "global_batch_size": cfg.train.global_batch_size,
             "sequences_seen": meta["step"] * cfg.train.global_batch_size, "backend": meta["backend"],
             "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "versions" in meta:
        facts["trained_with"] = meta["versions"]
    if records:
        facts["final_loss"] = records[-1]["loss"]
        if "fvu" in records[-1]:
            facts["final_fvu"] = records[-1]["fvu"]
    if identity is not None:
        facts["stage"] = 2
        facts["command"] = identity["command"]
        scores = {row: result["selection"] for row, result in run.results().items()}
        if scores:
            facts["scores"] = scores
    else:
        facts["stage"] = 1
    return facts


def _trained_model(run: RunFolder, step: int | None):
    """(the trained module, its body, its task section or None, checkpoint meta, the run's settings and identity)."""
    if run.identity() is None:
        cfg = run.settings()
        stack = build_stack(cfg.model)
        return stack, "stack", None, Checkpoints(run).load_trainable(stack, step), cfg, None
    from mtllm_train.tasks.data import label_names
    from mtllm_train.tasks.models import load_task_run
    from mtllm_train.tasks.selection import source_best_step

    model, identity, cfg = load_task_run(run)
    step = source_best_step(run) if step is None else step  # S-DEV's checkpoint: one model for every language
    meta = Checkpoints(run).load_trainable(model, step)
    task = {"name": cfg.task.name, "labels": list(label_names(cfg.task)), "metric": cfg.task.metric}
    if task_shape(cfg.task.name) == "token":
        task["word_pooling"] = cfg.task.word_pooling
    return model, identity["kind"], task, meta, cfg, identity


def export_run(run: str, out: str | None = None, step: int | None = None, force: bool = False,
               merge: bool = False) -> Path:
    run_folder = RunFolder(run)
    out_dir = Path(out) if out else run_folder.export_dir
    run_folder.settings()  # a folder that is no run is refused before anything is written
    _recover_interrupted_exports(out_dir)
    _check_destination(out_dir, force)
    model, body, task, meta, cfg, identity = _trained_model(run_folder, step)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        from mtllm_train.tasks.models import kept_stage1_lora, merges_stage1
        stage1_lora = kept_stage1_lora(run_folder) if merges_stage1(identity, cfg) else None
        _write_export(partial, model, body, task, cfg, _training_facts(run_folder, cfg, meta, identity), merge,
                      stage1_lora)
        del model  # the export is loaded back next: one copy of the model in memory at a time
        _record_guard(partial)
        if out_dir.exists():  # an earlier export, with force: swap, then drop the old one
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            partial.rename(out_dir)
            shutil.rmtree(old)
        else:
            partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _write_export(folder: Path, model, body: str, task: dict | None, cfg: Config, facts: dict, merge: bool,
                  stage1_lora: dict | None = None) -> None:
    """stage1_lora: the stage-1 LoRA a task.stage1_lora merge run merged into its frozen LLM (which the export
    then holds)."""
    model_cfg = cfg.model
    body_module = model if task is None else model.body  # the MTLLM stack, or the LoRA-wrapped LLM / encoder
    adapted = body_module.llm if body == "stack" else body_module

    def frozen_llm(llm_cfg: ModelConfig):
        """The frozen LLM as the run trained on it."""
        llm = build_llm(llm_cfg)
        if stage1_lora is None:
            return llm
        from mtllm_train.tasks.models import merged_stage1
        return merged_stage1(add_lora(llm, llm_cfg), stage1_lora)

    sources = {}
    if body in ("stack", "mt_encoder"):
        # The whole model an encoder-decoder's encoder comes from: the loader takes its encoder again.
        sources["mt_encoder"] = _frozen_source(model_cfg.mt_encoder, "mt_encoder", lambda: load_model(
            model_cfg.mt_encoder, "model.mt_encoder", model_cfg, quantize=False), folder)
    if body in ("stack", "llm"):
        unquantized = dataclasses.replace(model_cfg, quantization="none", bidirectional=False)
        sources["llm"] = _frozen_source(model_cfg.llm, "llm", lambda: frozen_llm(unquantized), folder,
                                        changed=stage1_lora is not None)
    if merge:
        if body == "mt_encoder":
            raise ConfigError("--merge: only an LLM body (stage 1, or stage-2 stack / llm models) is merged")
        _merged_llm(adapted, model_cfg, frozen_llm).save_pretrained(str(folder / MERGED_LLM_DIR))
        sources["llm"] = f"./{MERGED_LLM_DIR}"
    else:
        adapted.save_pretrained(str(folder / ADAPTER_DIR))
        _name_the_base(folder / ADAPTER_DIR / "adapter_config.json",
                       sources["mt_encoder" if body == "mt_encoder" else "llm"], task)
        (folder / ADAPTER_DIR / "README.md").write_text(ADAPTER_README, encoding="utf-8")  # not peft's blank template
    if body == "stack":
        save_file({"weight": body_module.projection.weight.detach().contiguous(),
                   "bias": body_module.projection.bias.detach().contiguous()}, str(folder / PROJECTION_FILE))
    if task is not None:
        save_file({name: tensor.detach().contiguous() for name, tensor in model.head.state_dict().items()},
                  str(folder / HEAD_FILE))
    view = "llm" if body == "llm" else "mt"
    tokenizer = view_tokenizer(model_cfg, view)
    tokenizer.save_pretrained(str(folder))
    if body == "stack":
        view_tokenizer(model_cfg, "llm").save_pretrained(str(folder / TEACHER_TOKENIZER_DIR))
    max_length = cfg.task.max_length if task is not None else cfg.data.max_length
    quantization = "none" if merge else stored_quantization(model_cfg)
    config = MTLLMConfig(body=body, mt_encoder=sources.get("mt_encoder", ""), llm=sources.get("llm", ""),
                         bidirectional=model_cfg.bidirectional, pooling=model_cfg.pooling,
                         frozen_dtype=model_cfg.dtype, quantization=quantization,
                         merged=merge, task=task, view_max_length={"mt": max_length, "llm": max_length},
                         source_language=ENGLISH, quant_double=model_cfg.quant_double,
                         quant_compute_dtype=model_cfg.quant_compute_dtype,
                         quant_storage_dtype=model_cfg.quant_storage_dtype)
    config.auto_map = {"AutoConfig": "configuration_mtllm.MTLLMConfig", "AutoModel": "modeling_mtllm.MTLLMModel"}
    config.languages = sorted(language_codes(tokenizer))
    config.export_format = FORMAT_VERSION
    config.versions = guard.library_versions(guard.loading_libraries(quantization))
    config.trained_from = {"mt_encoder": model_cfg.mt_encoder, "llm": model_cfg.llm}
    config.training = facts
    config.save_pretrained(str(folder))
    for code in PORTABLE_CODE.glob("*.py"):
        if code.name != "__init__.py":
            shutil.copy(code, folder / code.name)
    if task is None:
        _sentence_transformers_files(folder, model_cfg.pooling, max_length, body_module.llm.config.hidden_size)


def _record_guard(folder: Path) -> None:
    """The written export, loaded back from its folder as its users load it, computes the probes its loads will
    compare with (portable/guard.py); then the model card, which lists the versions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.ExportDriftWarning)  # nothing recorded yet, nothing to check
        model = MTLLMModel.from_pretrained(folder, guard="off")
    model.config.probe_record = guard.record(model, folder)
    model.config.save_pretrained(str(folder))
    (folder / "README.md").write_text(model_card(model.config), encoding="utf-8")


def _merged_llm(adapted, model_cfg: ModelConfig, frozen_llm=build_llm):
    """The LoRA merged into the LLM in bfloat16 (a 4-bit base is rebuilt unquantized first); frozen_llm builds
    the frozen LLM the run trained on from a model config."""
    merged_cfg = dataclasses.replace(model_cfg, quantization="none", dtype="bfloat16", bidirectional=False)
    base = frozen_llm(merged_cfg)
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    peft_model = PeftModel(base, adapted.peft_config["default"])
    set_peft_model_state_dict(peft_model, get_peft_model_state_dict(adapted))
    return peft_model.merge_and_unload().to(torch.bfloat16)


def _name_the_base(adapter_config: Path, base: str, task: dict | None) -> None:
    """peft's loaders need the base model and the task type; the training run left both empty."""
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base
    if isinstance(settings.get("target_modules"), list):  # peft writes a set's order: exports of one run would differ
        settings["target_modules"] = sorted(settings["target_modules"])
    settings["task_type"] = "FEATURE_EXTRACTION" if task is None else "SEQ_CLS"
    adapter_config.write_text(json.dumps(settings, indent=2))


def _sentence_transformers_files(folder: Path, pooling: str, max_length: int, hidden: int) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode": ST_POOLING[pooling]}, indent=2))


def _refuse_non_export(path_or_hub_id: str | Path) -> None:
    if Path(path_or_hub_id).exists() and not _is_export(Path(path_or_hub_id)):
        raise ConfigError(f"{path_or_hub_id}: not an exported MT-LLM (no config.json of model_type mtllm); create "
                          f"one with `mtllm export`")


def load_mtllm(path_or_hub_id: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, guard: str | None = None) -> MTLLMModel:
    """An exported MT-LLM (local folder or hub id), frozen, in eval mode: `encode(texts, lang=...)` for an
    embedder, `predict(inputs, lang=...)` / `predict_proba` for a task model. Inputs follow its device.
    guard: warn, strict or off: what a load does when the export computes other outputs than it recorded
    (default: MTLLM_GUARD, else warn)."""
    _refuse_non_export(path_or_hub_id)
    return MTLLMModel.from_pretrained(path_or_hub_id, device=device, dtype=dtype, guard=guard)


def embedder_config(path_or_hub_id: str | Path, command: str) -> MTLLMConfig:
    """The config of a stage-1 export (an MT-LLM stack without a task head), read without its weights, for the
    commands that evaluate embedders; any other export is refused in one line."""
    _refuse_non_export(path_or_hub_id)
    config = MTLLMConfig.from_pretrained(str(path_or_hub_id))
    if config.body != "stack" or config.task is not None:
        raise ConfigError(f"--model {path_or_hub_id}: {command} reads a stage-1 embedder export (an MT-LLM stack "
                          f"without a task head); this one is a {config.body} "
                          f"{'task model' if config.task is not None else 'model'}")
    return config


def load_embedder(path_or_hub_id: str | Path, command: str) -> MTLLMModel:
    """A stage-1 export, checked by `embedder_config` before its weights load."""
    embedder_config(path_or_hub_id, command)
    return load_mtllm(path_or_hub_id)


def verify_export(path_or_hub_id: str | Path) -> guard.Report | None:
    """`mtllm verify`: the export's probes recomputed against the recorded ones (None: it recorded none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.ExportDriftWarning)
        model = load_mtllm(path_or_hub_id, guard="off")
    return guard.compare(model, model.export_folder)

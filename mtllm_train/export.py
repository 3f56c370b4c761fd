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
import yaml
from safetensors.torch import save_file

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, ModelConfig, load_config, stored_quantization
from mtllm_train.loop import run_identity
from mtllm_train.metrics import read_records
from mtllm_train.model.loading import build_llm, load_model
from mtllm_train.model.stack import MTLLM, build_stack
from mtllm_train.model.tokenizers import view_tokenizer
from mtllm_train.portable import configuration_mtllm, guard
from mtllm_train.portable.configuration_mtllm import FORMAT_VERSION, MTLLMConfig
from mtllm_train.portable.modeling_mtllm import MTLLMModel
from mtllm_train.portable.tokens import ENGLISH, language_codes

PORTABLE_CODE = Path(configuration_mtllm.__file__).parent
ST_POOLING = {"mean": "mean", "eos": "lasttoken", "bos": "cls"}  # our pooling -> sentence-transformers' mode
ADAPTER_README = """# The LoRA adapter of an MT-LLM export

This folder is one part of the MT-LLM exported one level up: load that whole folder (its README.md says how).
It rebuilds the frozen parts around this adapter (the MT encoder, the projection, bidirectional attention where the
run trained with it); peft loading this adapter alone onto the base LLM gives neither.
"""


def load_trained_stack(run_dir: Path, step: int | None = None) -> tuple[MTLLM, ModelConfig, dict]:
    """A stage-1 run's stack with the trainable weights of a checkpoint, in this (single) process."""
    cfg = _run_config(run_dir)
    stack = build_stack(cfg.model)
    meta = Checkpoints(run_dir).load_trainable(stack, step)
    return stack.eval(), cfg.model, meta


def _run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _recover_interrupted_exports(out_dir: Path) -> None:
    """What an export killed mid-way left beside --out (hidden folders named by its pid, now gone): a partial
    export is removed; an earlier export moved aside by --force goes back into place if nothing took it (the
    kill came between the two renames), else it is removed."""
    for stale in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*")):
        kind, _, pid = stale.name.removeprefix(f".{out_dir.name}.").rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            stale.rename(out_dir)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _frozen_source(spec: str | dict, name: str, module_fn, folder: Path) -> str:
    """Where the export's loader finds a frozen part: the hub id / path it was trained from, or, for a model
    built from an inline config, its weights saved into the export (nothing else could rebuild them)."""
    if isinstance(spec, str):
        return spec
    module_fn().save_pretrained(str(folder / "frozen" / name))
    return f"./frozen/{name}"


def _training_facts(run_dir: Path, cfg: Config, meta: dict, identity: dict | None) -> dict:
    records = [r for r in read_records(run_dir / "metrics.jsonl") if r["step"] <= meta["step"]] \
        if (run_dir / "metrics.jsonl").is_file() else []
    facts = {"run": run_dir.name, "step": meta["step"], "global_batch_size": cfg.train.global_batch_size,
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
        results = {path.stem: json.loads(path.read_text())["selection"]
                   for path in sorted((run_dir / "results").glob("*.json"))} if (run_dir / "results").is_dir() else {}
        if results:
            facts["scores"] = results
    else:
        facts["stage"] = 1
    return facts


def _trained_model(run_dir: Path, cfg: Config, identity: dict | None, step: int | None):
    """(the trained module, its body, its task section or None, checkpoint meta) of a run."""
    if identity is None:
        stack = build_stack(cfg.model)
        return stack, "stack", None, Checkpoints(run_dir).load_trainable(stack, step)
    from mtllm_train.tasks.data import NLI_LABELS
    from mtllm_train.tasks.models import build_task_model, load_head, load_projection
    from mtllm_train.tasks.selection import source_best_step

    model = build_task_model(cfg, identity["kind"])
    if identity["command"] == "task-distill":  # first: the teacher's head is frozen, not in this run's checkpoints
        load_head(model.head, cfg.task.teacher, identity["teacher_step"])
    step = source_best_step(run_dir) if step is None else step  # S-DEV's checkpoint: one model for every language
    meta = Checkpoints(run_dir).load_trainable(model, step)
    load_projection(model, run_dir)
    labels = list(cfg.task.labels) or (list(NLI_LABELS) if cfg.task.name == "nli" else [])
    return model, identity["kind"], {"name": cfg.task.name, "labels": labels, "metric": cfg.task.metric}, meta


def export_run(run: str, out: str | None = None, step: int | None = None, force: bool = False,
               merge: bool = False) -> Path:
    run_dir = Path(run)
    out_dir = Path(out) if out else run_dir / "export"
    cfg = _run_config(run_dir)
    _recover_interrupted_exports(out_dir)
    _check_destination(out_dir, force)
    identity = run_identity(run_dir)
    model, body, task, meta = _trained_model(run_dir, cfg, identity, step)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_export(partial, model, body, task, cfg, _training_facts(run_dir, cfg, meta, identity), merge)
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


def _write_export(folder: Path, model, body: str, task: dict | None, cfg: Config, facts: dict, merge: bool) -> None:
    model_cfg = cfg.model
    body_module = model if task is None else model.body  # the MTLLM stack, or the LoRA-wrapped LLM / encoder
    adapted = body_module.llm if body == "stack" else body_module
    sources = {}
    if body in ("stack", "mt_encoder"):
        # The whole model an encoder-decoder's encoder comes from: the loader takes its encoder again.
        sources["mt_encoder"] = _frozen_source(model_cfg.mt_encoder, "mt_encoder", lambda: load_model(
            model_cfg.mt_encoder, "model.mt_encoder", model_cfg, quantize=False), folder)
    if body in ("stack", "llm"):
        unquantized = dataclasses.replace(model_cfg, quantization="none", bidirectional=False)
        sources["llm"] = _frozen_source(model_cfg.llm, "llm", lambda: build_llm(unquantized), folder)
    if merge:
        if body == "mt_encoder":
            raise ConfigError("--merge: only an LLM body (stage 1, or stage-2 stack / llm models) is merged")
        _merged_llm(adapted, model_cfg).save_pretrained(str(folder / "llm"))
        sources["llm"] = "./llm"
    else:
        adapted.save_pretrained(str(folder / "adapter"))
        _name_the_base(folder / "adapter" / "adapter_config.json",
                       sources["mt_encoder" if body == "mt_encoder" else "llm"], task)
        (folder / "adapter" / "README.md").write_text(ADAPTER_README, encoding="utf-8")  # not peft's blank template
    if body == "stack":
        save_file({"weight": body_module.projection.weight.detach().contiguous(),
                   "bias": body_module.projection.bias.detach().contiguous()}, str(folder / "projection.safetensors"))
    if task is not None:
        save_file({name: tensor.detach().contiguous() for name, tensor in model.head.state_dict().items()},
                  str(folder / "head.safetensors"))
    view = "llm" if body == "llm" else "mt"
    tokenizer = view_tokenizer(model_cfg, view)
    tokenizer.save_pretrained(str(folder))
    if body == "stack":
        view_tokenizer(model_cfg, "llm").save_pretrained(str(folder / "tokenizers" / "llm"))
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


def _merged_llm(adapted, model_cfg: ModelConfig):
    """The LoRA merged into the LLM in bfloat16 (a 4-bit base is rebuilt unquantized first)."""
    merged_cfg = dataclasses.replace(model_cfg, quantization="none", dtype="bfloat16", bidirectional=False)
    base = build_llm(merged_cfg)
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


def model_card(config: MTLLMConfig) -> str:
    """README.md with the Hub's YAML front matter, from the export's config."""
    facts, task = config.training, config.task
    bases = [source for source in (config.trained_from["mt_encoder"], config.trained_from["llm"])
             if isinstance(source, str) and source and not source.startswith(("/", "./"))]
    languages = sorted({code.split("_")[0] for code in config.languages}) or ["en"]
    front = {"library_name": "transformers", **({"base_model": bases} if bases else {}), "language": languages,
             "tags": ["mtllm", "model-stacking", "self-distillation", "multilingual"]
             + (["sentence-transformers", "feature-extraction"] if task is None else ["text-classification"]),
             "pipeline_tag": "feature-extraction" if task is None else "text-classification"}
    if facts.get("scores"):
        front["model-index"] = [{"name": facts["run"], "results": _index_results(task, facts["scores"])}]
    kind = ("an embedder (stage 1: self-distillation)" if task is None else
            f"a {task['name']} model (stage 2, {facts.get('command')}, body: {config.body})")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# MT-LLM: {facts['run']}", "",
             f"An MT encoder stacked under an English LLM, exported by mtllm-train: {kind}. It reads text in "
             f"{len(config.languages) or 1} languages through the MT encoder"
             + (" and answers in the LLM's representation space." if task is None else "."), "",
             "## Training", "",
             f"- frozen MT encoder: `{config.trained_from['mt_encoder'] if isinstance(config.trained_from['mt_encoder'], str) else 'inline config'}`; "
             f"frozen LLM: `{config.trained_from['llm'] if isinstance(config.trained_from['llm'], str) else 'inline config'}`"
             f" ({'bidirectional' if config.bidirectional else 'causal'} attention, {config.pooling} pooling, "
             f"{config.quantization} quantization)",
             f"- {facts['step']} optimizer steps of {facts['global_batch_size']} sequences "
             f"({facts['sequences_seen']} sequences seen), max length {config.view_max_length['mt']} tokens per view",
             *([f"- final loss {facts['final_loss']:.4g}" + (f", FVU {facts['final_fvu']:.3f}" if "final_fvu" in facts else "")]
               if "final_loss" in facts else []), ""]
    if facts.get("scores"):
        lines += ["## Evaluation (zero-shot cross-lingual transfer)", ""]
        for row, selection in facts["scores"].items():
            lines += [f"{row}, S-DEV checkpoint (step {selection['s_dev']['step']}):", "",
                      "| language | score |", "|---|---|",
                      *[f"| {language} | {100 * score:.1f} |" for language, score in selection["s_dev"]["test"].items()], ""]
    versions = getattr(config, "versions", None) or {}
    if versions:
        trained = facts.get("trained_with") or {}
        lines += ["## Versions", "",
                  "Every load recomputes a few probe texts and compares them with the outputs recorded at export "
                  "(`guard.safetensors`): a library that changes what this model computes is reported by a warning "
                  "(`guard=\"strict\"` or `MTLLM_GUARD=strict` makes it an error; `mtllm verify PATH` prints every "
                  "probe).", "",
                  "| library | exported with | trained with |", "|---|---|---|",
                  *[f"| {name} | {version} | {trained.get(name, '-')} |" for name, version in versions.items()], ""]
    usage = ('model.encode(["Ein Satz."], lang="deu_Latn")' if task is None
             else 'model.predict(["Ein Satz."], lang="deu_Latn")')
    lines += ["## Use", "", "```python", "from transformers import AutoModel", "",
              'model = AutoModel.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)', usage, "```", ""]
    if task is None:
        lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
                  'model = SentenceTransformer("PATH_OR_HUB_ID", trust_remote_code=True)',
                  'model.tokenizer.src_lang = "deu_Latn"  # the language of the texts (FLORES-200 code)',
                  'vectors = model.encode(["Ein Satz."])', "```", ""]
    lines += ["With mtllm-train installed: `mtllm_train.export.load_mtllm(PATH_OR_HUB_ID, device=..., dtype=...)`, "
              "or `mtllm predict --model PATH --lang deu_Latn TEXT ...`.", "",
              "## Limits", "",
              "- The text's language must be given (a FLORES-200 code such as `deu_Latn`); the MT encoder is told "
              "the source language, it does not detect it.",
              "- Languages the MT encoder reads poorly are read poorly here; the LLM knows only what it learned in "
              "English.",
              "- The frozen parts are rebuilt from their sources above; a bidirectional LLM must be rebuilt "
              "bidirectional (this code does it; loading the adapter onto a plain causal base with peft does not).",
              ""]
    return "\n".join(lines)


def _index_results(task: dict, scores: dict) -> list[dict]:
    """The Hub's model-index results: per benchmark row, the S-DEV checkpoint's test score per language and
    their average, in percent."""
    results = []
    for row, selection in scores.items():
        per_language = selection["s_dev"]["test"]
        metrics = [{"type": task["metric"], "name": f"{task['metric']} ({language})", "value": round(100 * score, 2)}
                   for language, score in per_language.items()]
        metrics.append({"type": task["metric"], "name": f"{task['metric']} (average)",
                        "value": round(100 * sum(per_language.values()) / len(per_language), 2)})
        results.append({"task": {"type": "text-classification", "name": task["name"]},
                        "dataset": {"name": row, "type": row.split(":")[0]}, "metrics": metrics})
    return results


def load_mtllm(path_or_hub_id: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, guard: str | None = None) -> MTLLMModel:
    """An exported MT-LLM (local folder or hub id), frozen, in eval mode: `encode(texts, lang=...)` for an
    embedder, `predict(inputs, lang=...)` / `predict_proba` for a task model. Inputs follow its device.
    guard: warn, strict or off: what a load does when the export computes other outputs than it recorded
    (default: MTLLM_GUARD, else warn)."""
    if Path(path_or_hub_id).exists() and not _is_export(Path(path_or_hub_id)):
        raise ConfigError(f"{path_or_hub_id}: not an exported MT-LLM (no config.json of model_type mtllm); create "
                          f"one with `mtllm export`")
    return MTLLMModel.from_pretrained(path_or_hub_id, device=device, dtype=dtype, guard=guard)


def verify_export(path_or_hub_id: str | Path) -> guard.Report | None:
    """`mtllm verify`: the export's probes recomputed against the recorded ones (None: it recorded none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.ExportDriftWarning)
        model = load_mtllm(path_or_hub_id, guard="off")
    return guard.compare(model, model.export_folder)


def read_inputs(path: str | None, texts: list[str], model: MTLLMModel) -> list:
    """`mtllm predict`'s inputs: texts from the command line, or one JSON object per line of a file."""
    if bool(path) == bool(texts):
        raise ConfigError("mtllm predict: give texts or --input FILE.jsonl (one of them)")
    if texts:
        if model.config.task is not None and model.config.task["name"] != "sentiment":
            raise ConfigError(f"mtllm predict: a {model.config.task['name']} model reads several fields per input; "
                              f"give them in --input FILE.jsonl")
        return texts
    if not Path(path).is_file():
        raise ConfigError(f"--input {path}: no such file")
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object (e.g. {{\"text\": ...}}), got "
                                  f"{type(record).__name__}")
            if model.config.task is None and "text" not in record:
                raise ConfigError(f"{path}:{number}: no 'text' field to embed")
            records.append(record if model.config.task is not None else record["text"])
    if not records:
        raise ConfigError(f"--input {path}: no inputs (one JSON object per line)")
    return records

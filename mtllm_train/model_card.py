"""The model card (README.md) of an export: the Hub's YAML front matter (base models, languages, tags, model-index
with stage-2 scores) and what a user of the model needs: how it was trained, its scores, the library versions its
load check compares, how to use it and its limits. Built from the export's config alone."""

from __future__ import annotations

import yaml

from mtllm_train.portable.configuration_mtllm import MTLLMConfig
from mtllm_train.portable.format import task_shape


def hub_task(task: dict) -> str:
    """The Hub's task type of a stage-2 model: a label per word, or per text."""
    return "token-classification" if task_shape(task["name"]) == "token" else "text-classification"


def model_card(config: MTLLMConfig) -> str:
    """README.md with the Hub's YAML front matter, from the export's config."""
    facts, task = config.training, config.task
    bases = [source for source in (config.trained_from["mt_encoder"], config.trained_from["llm"])
             if isinstance(source, str) and source and not source.startswith(("/", "./"))]
    languages = sorted({code.split("_")[0] for code in config.languages}) or ["en"]
    front = {"library_name": "transformers", **({"base_model": bases} if bases else {}), "language": languages,
             "tags": ["mtllm", "model-stacking", "self-distillation", "multilingual"]
             + (["sentence-transformers", "feature-extraction"] if task is None else [hub_task(task)]),
             "pipeline_tag": "feature-extraction" if task is None else hub_task(task)}
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
        results.append({"task": {"type": hub_task(task), "name": task["name"]},
                        "dataset": {"name": row, "type": row.split(":")[0]}, "metrics": metrics})
    return results

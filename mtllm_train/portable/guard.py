"""The export's guard: outputs recorded when it was exported, recomputed at every load.

An export's code patches attention (bidirectional), pools, projects and quantizes on top of transformers, peft
and bitsandbytes; a new release of any of them can change what it computes without an error (llm2vec's
bidirectional attention fell back to causal silently across transformers releases). So at export the model,
loaded back from its own folder as a user loads it, embeds (an embedder) or scores (a task model) a few fixed
probe texts in several languages and scripts; their outputs (float32, `guard.safetensors`) and the library
versions go into the export. Every load recomputes the probes (a few short forward passes) and compares: within
the tolerance of the precision the model computes in, nothing is said; beyond it, a warning (or an error when
loading is strict) names the probe, the deviation and the library versions that changed.

Mode: the loader's `guard` argument, else the environment variable MTLLM_GUARD: warn (default), strict, off.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .format import task_shape
from .tokens import InputError

GUARD_FILE = "guard.safetensors"
MODES = ("warn", "strict", "off")

# (language, text): one sentence in several scripts; a probe is used when the model's tokenizer knows its
# language (all of them when it knows no language codes, e.g. an LLM body).
PROBES = [
    ("eng_Latn", "The river flows through the old town before it reaches the sea."),
    ("deu_Latn", "Der Fluss fließt durch die Altstadt, bevor er das Meer erreicht."),
    ("fra_Latn", "La rivière traverse la vieille ville avant d'atteindre la mer."),
    ("rus_Cyrl", "Река течёт через старый город, прежде чем достичь моря."),
    ("arb_Arab", "يتدفق النهر عبر المدينة القديمة قبل أن يصل إلى البحر."),
    ("hin_Deva", "नदी समुद्र तक पहुँचने से पहले पुराने शहर से होकर बहती है।"),
    ("zho_Hans", "河流在到达大海之前流经老城。"),
    ("swh_Latn", "Mto unapita katikati ya mji wa zamani kabla ya kufika baharini."),
]

# Largest relative L2 deviation (|output - recorded| / |recorded|, per probe) that a load may show, by the
# precision the model computes in. Measured (README, "Exports that check themselves"): float32 reloads and
# batch / padding changes move the outputs by 1e-7 on CPU; a float32 export loaded in bfloat16 by 4e-3 (tiny
# stack), bf16 against fp32 weights on real models (MiniLM, SmolLM2: bench/base_precision.py) by 0.010.
# 4-bit models compute in their compute dtype (their quantization is deterministic): an NF4 export computed with
# its dequantized bf16 weights instead of bitsandbytes' kernel moves them by 1.2e-3.
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 5e-2}


class ExportDriftWarning(UserWarning):
    """An export computes something else than what it recorded when it was exported."""


def guard_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("MTLLM_GUARD") or "warn"
    if mode not in MODES:
        raise InputError(f"guard {mode!r}: expected one of {', '.join(MODES)} (the loader's guard= or MTLLM_GUARD)")
    return mode


# What an export's outputs depend on (and bitsandbytes for a 4-bit base); training also records its own.
LOADING_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "mtllm-train")
TRAINING_LIBRARIES = LOADING_LIBRARIES + ("bitsandbytes", "torchao", "deepspeed")


def loading_libraries(quantization: str) -> tuple[str, ...]:
    return LOADING_LIBRARIES + (("bitsandbytes",) if quantization != "none" else ())


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def precision(model) -> str:
    """The dtype the model computes in: its frozen weights', or a 4-bit base's compute dtype."""
    if model.config.quantization != "none":
        return model.config.quant_compute_dtype
    return str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")


def probe_set(config) -> list[dict]:
    known = set(config.languages or [])
    return [{"lang": lang, "text": text} for lang, text in PROBES if not known or lang in known]


def _task_input(task: str, text: str) -> dict:
    shape = task_shape(task)
    if shape == "pair":
        return {"premise": text, "hypothesis": "It is about a river."}
    if shape == "choice":
        return {"passage": text, "question": "What flows?", "answers": ["a river", "a car", "a song", "a cloud"]}
    if shape == "token":
        return {"words": text.split()}
    return {"text": text}


@torch.no_grad()
def probe_outputs(model, probes: list[dict]) -> torch.Tensor:
    """[probes, D] vectors (embedder) or [probes, C] logits (task model), float32 on the CPU. The tokenizer's
    source language is left as it was."""
    rows, source_language = [], getattr(model.tokenizer, "src_lang", None)
    try:
        for probe in probes:
            language = probe["lang"] if model.view == "mt" else None  # an LLM body's tokenizer takes no language
            if model.head is None:
                rows.append(model.encode(probe["text"], lang=language))
            else:
                rows.append(model.logits(_task_input(model.config.task["name"], probe["text"]), lang=language))
    finally:
        if source_language is not None:
            model.tokenizer.src_lang = source_language
    # A token model's probe gives [words, C]: each probe's row is all its words' logits, zero-padded to the longest.
    return torch.nn.utils.rnn.pad_sequence([row.float().cpu().reshape(-1) for row in rows], batch_first=True)


def record(model, folder: Path) -> dict:
    """Compute the probes with `model` (the export, loaded from `folder`) and save them there; returns what
    the export's config records beside them."""
    probes = probe_set(model.config)
    save_file({"outputs": probe_outputs(model, probes).contiguous()}, str(folder / GUARD_FILE))
    return {"probes": probes, "precision": precision(model)}


@dataclass
class Report:
    probes: list[dict]
    deviations: list[float]
    tolerance: float
    changed_versions: dict[str, tuple[str, str]]

    @property
    def drifted(self) -> bool:
        return max(self.deviations) > self.tolerance

    def worst(self) -> tuple[dict, float]:
        index = max(range(len(self.deviations)), key=self.deviations.__getitem__)
        return self.probes[index], self.deviations[index]

    def versions_line(self) -> str:
        if not self.changed_versions:
            return "the recorded library versions are the ones installed"
        return "versions now differ: " + ", ".join(f"{name} {then} -> {now}"
                                                  for name, (then, now) in self.changed_versions.items())

    def table(self) -> str:
        lines = [f"{'probe':<48} {'deviation':>10}  tolerance {self.tolerance:.0e}"]
        for probe, deviation in zip(self.probes, self.deviations):
            label = f"{probe['lang']}: {probe['text']}"
            label = label if len(label) <= 46 else label[:45] + "…"
            lines.append(f"{label:<48} {deviation:>10.2e}  {'ok' if deviation <= self.tolerance else 'DRIFT'}")
        return "\n".join(lines)


def compare(model, folder: Path) -> Report | None:
    """The probes recomputed against the recorded ones; None for an export that recorded none."""
    guard = getattr(model.config, "probe_record", None)
    if not guard or not (folder / GUARD_FILE).is_file():
        return None
    recorded = load_file(str(folder / GUARD_FILE))["outputs"]
    outputs = probe_outputs(model, guard["probes"])
    deviations = ((outputs - recorded).norm(dim=-1) / recorded.norm(dim=-1).clamp_min(1e-12)).tolist()
    # Loaded in another precision than it was recorded in: the looser of the two tolerances.
    tolerance = max(TOLERANCE.get(guard["precision"], max(TOLERANCE.values())),
                    TOLERANCE.get(precision(model), max(TOLERANCE.values())))
    then = getattr(model.config, "versions", None) or {}
    now = library_versions(loading_libraries(model.config.quantization))
    changed = {name: (then[name], now.get(name, "not installed")) for name in then if then[name] != now.get(name)}
    return Report(guard["probes"], deviations, tolerance, changed)


def check(model, folder: Path, where: str, mode: str) -> None:
    """The load-time check: silent within tolerance, else a warning (an InputError when strict)."""
    if mode == "off":
        warnings.warn(f"{where}: the export's load check is off (guard='off' / MTLLM_GUARD=off): its outputs are "
                      f"not compared with the ones recorded at export", ExportDriftWarning, stacklevel=3)
        return
    report = compare(model, folder)
    if report is None:
        warnings.warn(f"{where}: this export records no reference outputs (export format "
                      f"{getattr(model.config, 'export_format', 1)}, made before the load check): what it computes "
                      f"here cannot be checked; export the run again to add them", ExportDriftWarning, stacklevel=3)
        return
    if not report.drifted:
        return
    probe, deviation = report.worst()
    message = (f"{where}: computes other outputs than it recorded at export: probe {probe['lang']} "
               f"{probe['text'][:40]!r} deviates by {deviation:.2e} (relative L2; tolerance {report.tolerance:.0e}); "
               f"{report.versions_line()}. `mtllm verify` prints every probe; guard='off' skips the check")
    if mode == "strict":
        raise InputError(message)
    warnings.warn(message, ExportDriftWarning, stacklevel=3)

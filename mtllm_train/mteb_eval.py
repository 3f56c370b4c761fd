"""`mtllm mteb`: a stage-1 export on MTEB tasks, through the `mteb` library.

The stack reads a text through the MT encoder, which must be told the text's language. MTEB does not pass one
per text, but every task names the languages of each subset it evaluates (`eval_langs`), and the encoder is
told the subset of each call. So a call's source language is:

- the subset's language, when all of its texts are in one language (most tasks: one subset per language);
- for a parallel bitext task (FLORES-style: one column per language), the column mteb names as the subset;
- for a bitext or STS subset pairing two languages (Tatoeba's `deu-eng`, STS17's `en-de`), which mteb encodes a
  column per call: the language whose script the texts are written in, when the two scripts differ; else the
  language of the column the texts are, by mteb's convention that `sentence1` / `sentence2` follow the order
  of the subset's languages (mteb's data, not its code, keeps that convention).

Subsets that mix languages in other task types (cross-lingual retrieval, pair classification), or more than two
in a bitext or STS subset, give no way to tell which text is in which language: they are left out, with a line
saying so. MTEB's codes (ISO 639-3 and script, `deu-Latn`) become FLORES-200 codes; a macrolanguage becomes the
language NLLB-200 holds for it (`ara-Arab` -> `arb_Arab`), and a language the MT encoder lacks needs a fallback
(`--fallback pcm-Latn=eng_Latn`).
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from mteb.abstasks.aggregated_task import AbsTaskAggregate
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic
from mtllm_train.portable.tokens import ENGLISH
from mtllm_train.tasks.data import hub_failure

# MTEB's code of a macrolanguage (or another script name) -> the FLORES-200 code of the language NLLB-200 holds.
MTEB_ALIASES = {
    "ara-Arab": "arb_Arab", "aze-Latn": "azj_Latn", "cmn-Hans": "zho_Hans", "cmn-Hant": "zho_Hant",
    "fas-Arab": "pes_Arab", "fil-Latn": "tgl_Latn", "jpn-Hira": "jpn_Jpan", "kor-Kore": "kor_Hang",
    "kur-Arab": "ckb_Arab", "kur-Latn": "kmr_Latn", "lav-Latn": "lvs_Latn", "mon-Cyrl": "khk_Cyrl",
    "msa-Latn": "zsm_Latn", "nep-Deva": "npi_Deva", "nor-Latn": "nob_Latn", "ori-Orya": "ory_Orya",
    "orm-Latn": "gaz_Latn", "pus-Arab": "pbt_Arab", "sqi-Latn": "als_Latn", "swa-Latn": "swh_Latn",
    "uzb-Latn": "uzn_Latn", "yid-Hebr": "ydd_Hebr",
}
# Task types whose two-language subsets mteb encodes a column per call.
PAIRED_TYPES = ("BitextMining", "STS")
PAIR_COLUMNS = ("sentence1", "sentence2")
# ISO 15924 script -> the first word of its letters' Unicode names (unicodedata.name), for telling two columns
# in different scripts apart. Scripts not listed (or two alike, as Hans and Hant) fall back on column order.
SCRIPT_NAMES = {
    "Latn": {"LATIN"}, "Cyrl": {"CYRILLIC"}, "Arab": {"ARABIC"}, "Grek": {"GREEK"}, "Hebr": {"HEBREW"},
    "Deva": {"DEVANAGARI"}, "Beng": {"BENGALI"}, "Guru": {"GURMUKHI"}, "Gujr": {"GUJARATI"}, "Orya": {"ORIYA"},
    "Taml": {"TAMIL"}, "Telu": {"TELUGU"}, "Knda": {"KANNADA"}, "Mlym": {"MALAYALAM"}, "Sinh": {"SINHALA"},
    "Thai": {"THAI"}, "Laoo": {"LAO"}, "Tibt": {"TIBETAN"}, "Mymr": {"MYANMAR"}, "Geor": {"GEORGIAN"},
    "Armn": {"ARMENIAN"}, "Ethi": {"ETHIOPIC"}, "Khmr": {"KHMER"}, "Hang": {"HANGUL"}, "Kore": {"HANGUL"},
    "Hans": {"CJK"}, "Hant": {"CJK"}, "Jpan": {"CJK", "HIRAGANA", "KATAKANA"},
}
_CODE = re.compile(r"[a-z]{3}([_-][A-Z][a-z]{3})?")


def listed(items: list[str], shown: int = 4) -> str:
    """The first `shown` items, comma-separated, with ", ..." when there are more."""
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def column_language(column: str) -> str:
    """The MTEB code of a parallel task's column, which is named by its FLORES-200 code."""
    return column.replace("_", "-")


def local_task_metadata(name: str, task_type: str, eval_langs: dict | list, main_score: str,
                        split: str = "test") -> TaskMetadata:
    """The metadata of an mteb task of one's own over local files (`--tasks FILE.py:CLASS`): what mteb requires,
    with the catalogue fields (reference, dates, licence, ...) left empty."""
    return TaskMetadata(name=name, dataset={"path": f"local/{name}", "revision": "1"}, description=name,
                        reference=None, type=task_type, category="t2t", modalities=["text"], eval_splits=[split],
                        eval_langs=eval_langs, main_score=main_score, date=None, domains=None, task_subtypes=None,
                        license=None, annotations_creators=None, dialect=None, sample_creation=None,
                        bibtex_citation="")


def flores_code(mteb_code: str, codes: set[str], fallbacks: dict[str, str]) -> str | None:
    """The MT encoder's code for an MTEB language code, or None when it has none (and no fallback). An MT
    tokenizer without language codes (e5's: `codes` empty) reads every language alike."""
    if not codes:
        return fallbacks.get(mteb_code, mteb_code.replace("-", "_"))
    for candidate in (fallbacks.get(mteb_code), mteb_code.replace("-", "_"), MTEB_ALIASES.get(mteb_code)):
        if candidate in codes:
            return candidate
    return None


def subset_languages(task, subset: str) -> list[str]:
    """The MTEB language codes of one subset of a task, in mteb's order."""
    langs = task.metadata.eval_langs
    return list(langs[subset]) if isinstance(langs, dict) else list(langs)


def leaf_tasks(tasks) -> list:
    """The tasks that encode: an aggregate (CQADupstackRetrieval, say) stands for the tasks it combines."""
    return [leaf for task in tasks
            for leaf in (leaf_tasks(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task])]


def readable(task, subset: str) -> bool:
    """Whether each call of this subset can be given one language (see the module's docstring)."""
    langs = set(subset_languages(task, subset))
    return len(langs) == 1 or (len(langs) == 2 and task.metadata.type in PAIRED_TYPES)


def keep_readable_subsets(tasks) -> list[str]:
    """Leave out the subsets no language can be given to; one line per task that loses some. A task left with
    none is refused."""
    notes = []
    for task in leaf_tasks(tasks):
        left_out = [subset for subset in task.hf_subsets if not readable(task, subset)]
        if not left_out:
            continue
        if len(left_out) == len(task.hf_subsets):
            raise ConfigError(f"--tasks {task.metadata.name}: every subset mixes languages in a "
                              f"{task.metadata.type} task ({listed(left_out)}), "
                              f"and mteb does not say which text is in which: the stack, which needs each text's "
                              f"language, cannot run it")
        task.hf_subsets = [subset for subset in task.hf_subsets if subset not in left_out]
        notes.append(f"{task.metadata.name}: left out {len(left_out)} subset(s) mixing languages "
                     f"({listed(left_out)}): mteb does not say which "
                     f"of their texts is in which language")
    return notes


def call_languages(task, subset: str) -> list[str]:
    """The MTEB codes a subset's calls are read in: a parallel task's columns (named in its subsets, as FLORES
    codes) or the subset's languages."""
    if getattr(task, "parallel_subsets", False):
        return [column_language(column) for column in subset.split("-")]
    return subset_languages(task, subset)


def check_languages(tasks, codes: set[str], fallbacks: dict[str, str]) -> None:
    """Refuse, before any encoding, a language the MT encoder has no code for (all of them in one line)."""
    missing: dict[str, list[str]] = {}
    for task in leaf_tasks(tasks):
        for subset in task.hf_subsets:
            for lang in call_languages(task, subset):
                if flores_code(lang, codes, fallbacks) is None:
                    missing.setdefault(lang, []).append(f"{task.metadata.name}/{subset}")
    if missing:
        named = "; ".join(f"{lang} ({listed(where, 2)})"
                          for lang, where in sorted(missing.items()))
        raise ConfigError(f"--tasks: the MT encoder has no language code for {named}; give each a fallback "
                          f"(--fallback CODE=FLORES_CODE, e.g. --fallback {min(missing)}=eng_Latn) or leave it out "
                          f"with --languages (a parallel task's columns are named by FLORES-200 codes)")


def dominant_script(texts: list[str]) -> str | None:
    """The first word of the Unicode name most of the texts' letters share (LATIN, CYRILLIC, CJK, ...)."""
    counts = Counter(unicodedata.name(char, "").split(" ")[0] for text in texts for char in text if char.isalpha())
    return counts.most_common(1)[0][0] if counts else None


class StackEncoder(AbsEncoder):
    """The export as an mteb encoder (cosine similarity, mteb's): each call's texts read by the stack in the
    language mteb evaluates them in (see the module's docstring). `read_as` records (task, subset, split,
    language, how it was told, number of texts) per call."""

    def __init__(self, model, tasks, fallbacks: dict[str, str] | None = None, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size
        self.tasks = {task.metadata.name: task for task in leaf_tasks(tasks)}
        self.fallbacks = fallbacks or {}
        self.codes = set(model.config.languages)
        self.read_as: list[dict] = []
        folder = Path(str(model.export_folder))
        self.mteb_model_meta = ModelMeta(
            loader=None, name=f"mtllm/{folder.name}", revision=str(model.config.training.get("step", "none")),
            release_date=None, languages=None, n_parameters=sum(p.numel() for p in model.parameters()),
            memory_usage_mb=None, max_tokens=model.config.view_max_length["mt"],
            embed_dim=model.llm.config.hidden_size, license=None, open_weights=True, public_training_code=None,
            public_training_data=None, framework=["PyTorch"], similarity_fn_name="cosine", use_instructions=False,
            training_datasets=None)

    def language(self, task_name: str, subset: str, split: str, texts: list[str]) -> tuple[str, str]:
        """(the FLORES-200 code the texts of one call are read as, how it was found)."""
        task = self.tasks[task_name]
        if getattr(task, "parallel_subsets", False) and subset not in task.hf_subsets:
            lang, how = column_language(subset), "column"  # mteb names a parallel task's column as the subset
        else:
            langs = subset_languages(task, subset)
            lang, how = langs[0], "subset"
            if len(set(langs)) > 1:
                lang, how = self._language_of_pair(task, subset, split, langs, texts)
        return flores_code(lang, self.codes, self.fallbacks), how  # a code: check_languages made sure

    @staticmethod
    def _language_of_pair(task, subset: str, split: str, langs: list[str], texts: list[str]) -> tuple[str, str]:
        scripts = [SCRIPT_NAMES.get(lang.split("-")[-1], set()) for lang in langs]
        if all(scripts) and not scripts[0] & scripts[1]:  # two known, different scripts: the letters tell
            found = dominant_script(texts)
            by_script = [lang for lang, names in zip(langs, scripts) if found in names]
            if len(by_script) == 1:
                return by_script[0], "script"
        data = task.dataset[subset] if subset in task.dataset else task.dataset
        pair = getattr(task, "column_names", PAIR_COLUMNS)
        columns = [name for name in pair if list(data[split][name]) == texts]
        if len(columns) != 1:
            raise ConfigError(f"mteb task {task.metadata.name}, subset {subset!r}: a call's {len(texts)} texts are "
                              f"not one of its columns {', '.join(pair)}; their language is unknown")
        return langs[pair.index(columns[0])], "column"

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        lang, how = self.language(task_metadata.name, hf_subset, hf_split, texts)
        self.read_as.append({"task": task_metadata.name, "subset": hf_subset, "split": hf_split, "lang": lang,
                             "by": how, "texts": len(texts)})
        return self.model.encode(texts, lang=lang, batch_size=self.batch_size, convert_to_numpy=True)


def wanted(mteb_code: str, requested: set[str]) -> bool:
    """Whether a subset language is among `requested` (ISO 639-3 codes, or FLORES-200 codes: exact, or the
    language NLLB-200 holds for a macrolanguage)."""
    return (mteb_code.split("-")[0] in requested or mteb_code.replace("-", "_") in requested
            or MTEB_ALIASES.get(mteb_code) in requested)


def keep_languages(task, languages: list[str]) -> None:
    """Keep the subsets of a task all of whose languages are among `languages` (and English, for the bitext and
    STS tasks, which pair languages with it)."""
    requested = set(languages) | ({ENGLISH} if task.metadata.type in PAIRED_TYPES else set())
    kept = [subset for subset in task.hf_subsets
            if all(wanted(lang, requested) for lang in subset_languages(task, subset))]
    if not kept:
        raise ConfigError(f"--languages {','.join(languages)}: {task.metadata.name} has none of them (its subsets: "
                          f"{listed(task.hf_subsets, 8)})")
    task.hf_subsets = kept


def _task_from_file(spec: str):
    import importlib.util

    from mteb.abstasks.abstask import AbsTask

    path, class_name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise ConfigError(f"--tasks {spec}: no file {path} (expected FILE.py:CLASS, an mteb task class)")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        task_class = getattr(module, class_name, None)
        if isinstance(task_class, type) and issubclass(task_class, AbsTask):
            return task_class()
    except Exception as err:  # the user's own file: whatever it raises, it is one line naming it
        raise ConfigError(f"--tasks {spec}: {path} failed ({type(err).__name__}: {err})") from None
    raise ConfigError(f"--tasks {spec}: {path} has no mteb task class {class_name!r} (a subclass of mteb's AbsTask)")


def find_tasks(specs: list[str], languages: list[str] | None = None) -> list:
    """mteb tasks: names of mteb's tasks (superseded and aggregate ones too), or FILE.py:CLASS for a task of
    one's own (an mteb AbsTask subclass, e.g. over local files). With `languages` (ISO 639-3 codes such as deu,
    or FLORES-200 codes such as deu_Latn), each task keeps the subsets all of whose languages are among them (or
    English, in bitext and STS tasks): German and English of FLORES, not German with its 200 other languages."""
    import mteb

    for code in languages or []:
        if not _CODE.fullmatch(code):
            raise ConfigError(f"--languages: {code!r} is not a language code (expected ISO 639-3 codes such as deu "
                              f"or FLORES-200 codes such as deu_Latn, comma-separated)")
    requested = [code.replace("-", "_") for code in languages or []]
    tasks = []
    for spec in specs:
        if ":" in spec:
            task = _task_from_file(spec)
        else:
            try:
                task = mteb.get_task(spec)
            except KeyError:
                known = [task.metadata.name for task in mteb.get_tasks(exclude_superseded=False)]
                close = difflib.get_close_matches(spec, known, n=2)
                raise ConfigError(f"--tasks {spec}: not an mteb task{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}"
                                  f"; mteb.get_tasks() lists them, and FILE.py:CLASS names a task of your own") from None
        if requested:
            for leaf in leaf_tasks([task]):
                keep_languages(leaf, requested)
        tasks.append(task)
    return tasks


def load_task_data(tasks) -> None:
    """Each task's data, loaded before the model: a task that cannot be read is one line naming it."""
    for task in leaf_tasks(tasks):
        try:
            task.load_data()
        except Exception as err:  # datasets raises many kinds (offline, missing, gated); each is the same failure
            raise hub_failure(f"--tasks {task.metadata.name}", err, "; a task of your own reads what its "
                                                                  "load_data reads") from None


def run_mteb(export: str, tasks, out: str, fallbacks: dict[str, str] | None = None, batch_size: int = 32) -> dict:
    """Evaluate a stage-1 export on mteb tasks; mteb's result files in OUT/results, its predictions in
    OUT/predictions, OUT/summary.json and OUT/summary.md (each subset's main score, the subsets left out and the
    language each call was read as). Everything a user can get wrong is refused before the weights load."""
    import mteb

    from mtllm_train.export import embedder_config, load_mtllm

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected a positive number of texts per forward")
    codes = set(embedder_config(export, "mtllm mteb").languages)
    fallbacks = fallbacks or {}
    for code, target in fallbacks.items():
        if codes and target not in codes:
            raise ConfigError(f"--fallback {code}={target}: {target!r} is not a language code of the MT tokenizer")
    left_out = keep_readable_subsets(tasks)
    for note in left_out:
        print(f"mtllm mteb: {note}")
    check_languages(tasks, codes, fallbacks)
    load_task_data(tasks)
    encoder = StackEncoder(load_mtllm(export), tasks, fallbacks, batch_size)
    results = mteb.evaluate(encoder, tasks, cache=mteb.ResultCache(Path(out) / "results"),
                            overwrite_strategy="always", prediction_folder=Path(out) / "predictions",
                            encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
    rows = [{"task": task_result.task_name, "split": split, "subset": scores["hf_subset"],
             "main_score": scores["main_score"]}
            for task_result in results.task_results for split, per_subset in task_result.scores.items()
            for scores in per_subset]
    summary = {"model": str(export), "rows": rows, "left_out": left_out, "read_as": encoder.read_as}
    lines = ["| task | split | subset | main score |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['split']} | {r['subset']} | {r['main_score']:.4f} |" for r in rows]
    write_atomic(Path(out) / "summary.json", json.dumps(summary, indent=1))
    write_atomic(Path(out) / "summary.md", f"MTEB scores of {export}\n\n" + "\n".join(lines) + "\n")
    return summary

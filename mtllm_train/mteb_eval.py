"""`mtllm mteb`: a stage-1 export on MTEB tasks, through the `mteb` library.

The stack reads a text through the MT encoder, which must be told the text's language. MTEB does not pass one
per text, but every task names the languages of each subset it evaluates (`eval_langs`), and the encoder is
told the subset of each call. So a call's source language is:

- the subset's language, when all of its texts are in one language (most tasks: one subset per language);
- for a parallel bitext task (FLORES-style: one column per language), the column mteb names as the subset;
- for a subset pairing two languages (Tatoeba's `deu-eng`, a cross-lingual STS pair), the language of the
  column the call's texts are: the texts are compared with the subset's `sentence1` and `sentence2` columns,
  which mteb's pair tasks list in the order of the subset's languages.

Other tasks mixing languages in one subset (cross-lingual retrieval, pair classification, which may send
both columns in one call) are refused before anything runs. MTEB's codes (ISO 639-3 and script, `deu-Latn`)
become FLORES-200 codes; a macrolanguage becomes the language NLLB-200 holds for it (`ara-Arab` ->
`arb_Arab`), and a language the MT encoder lacks needs a fallback (`--fallback pcm-Latn=eng_Latn`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta

from mtllm_train.config import ConfigError
from mtllm_train.files import write_atomic
from mtllm_train.portable.tokens import ENGLISH

# MTEB's code of a macrolanguage (or another script name) -> the FLORES-200 code of the language NLLB-200 holds.
MTEB_ALIASES = {
    "ara-Arab": "arb_Arab", "aze-Latn": "azj_Latn", "cmn-Hans": "zho_Hans", "cmn-Hant": "zho_Hant",
    "fas-Arab": "pes_Arab", "fil-Latn": "tgl_Latn", "jpn-Hira": "jpn_Jpan", "kor-Kore": "kor_Hang",
    "kur-Arab": "ckb_Arab", "kur-Latn": "kmr_Latn", "lav-Latn": "lvs_Latn", "mon-Cyrl": "khk_Cyrl",
    "msa-Latn": "zsm_Latn", "nep-Deva": "npi_Deva", "nor-Latn": "nob_Latn", "ori-Orya": "ory_Orya",
    "orm-Latn": "gaz_Latn", "pus-Arab": "pbt_Arab", "sqi-Latn": "als_Latn", "swa-Latn": "swh_Latn",
    "uzb-Latn": "uzn_Latn", "yid-Hebr": "ydd_Hebr",
}
# Task types whose two-language subsets send each column alone, in the subset's language order.
PAIRED_TYPES = ("BitextMining", "STS")
PAIR_COLUMNS = ("sentence1", "sentence2")


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


def check_tasks(tasks, codes: set[str], fallbacks: dict[str, str]) -> None:
    """Refuse, before any encoding, a task the stack cannot be told the language of and a language it lacks."""
    missing: dict[str, list[str]] = {}
    for task in tasks:
        for subset in task.hf_subsets:
            langs = subset_languages(task, subset)
            paired = task.metadata.type in PAIRED_TYPES or getattr(task, "parallel_subsets", False)
            if len(set(langs)) > 1 and not paired:
                raise ConfigError(f"--tasks {task.metadata.name}: its subset {subset!r} mixes {', '.join(langs)} "
                                  f"in a {task.metadata.type} task, whose calls do not say which text is in which "
                                  f"language (the stack needs each text's language); choose its one-language "
                                  f"subsets with --languages, or a bitext or STS task")
            for lang in langs:
                if flores_code(lang, codes, fallbacks) is None:
                    missing.setdefault(lang, []).append(f"{task.metadata.name}/{subset}")
    if missing:
        named = "; ".join(f"{lang} ({', '.join(where[:2])}{', ...' if len(where) > 2 else ''})"
                          for lang, where in sorted(missing.items()))
        raise ConfigError(f"--tasks: the MT encoder has no language code for {named}; give each a fallback "
                          f"(--fallback CODE=FLORES_CODE, e.g. --fallback {min(missing)}=eng_Latn) or leave it out "
                          f"with --languages")


class StackEncoder(AbsEncoder):
    """The export as an mteb encoder (cosine similarity, mteb's): each call's texts read by the stack in the
    language mteb evaluates them in (see the module's docstring). `read_as` records (task, subset, split,
    language, number of texts) per call."""

    def __init__(self, model, tasks, fallbacks: dict[str, str] | None = None, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size
        self.tasks = {task.metadata.name: task for task in tasks}
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

    def language(self, task_name: str, subset: str, split: str, texts: list[str]) -> str:
        """The FLORES-200 code the texts of one call are read as."""
        task = self.tasks[task_name]
        if getattr(task, "parallel_subsets", False) and subset not in task.hf_subsets:
            langs = [subset.replace("_", "-")]  # a parallel task's column: its name is the language
        else:
            langs = subset_languages(task, subset)
        if len(set(langs)) > 1:
            data = task.dataset[subset] if subset in task.dataset else task.dataset
            pair = getattr(task, "column_names", PAIR_COLUMNS)
            columns = [name for name in pair if list(data[split][name]) == texts]
            if len(columns) != 1:
                raise ConfigError(f"mteb task {task_name}, subset {subset!r}: a call's {len(texts)} texts are not "
                                  f"one of its columns {', '.join(pair)}; their language is unknown")
            langs = [langs[pair.index(columns[0])]]
        return flores_code(langs[0], self.codes, self.fallbacks)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        lang = self.language(task_metadata.name, hf_subset, hf_split, texts)
        self.read_as.append({"task": task_metadata.name, "subset": hf_subset, "split": hf_split, "lang": lang,
                             "texts": len(texts)})
        return self.model.encode(texts, lang=lang, batch_size=self.batch_size, convert_to_numpy=True)


def find_tasks(specs: list[str], languages: list[str] | None = None) -> list:
    """mteb tasks: names of mteb's tasks, or FILE.py:CLASS for a task of one's own (an mteb AbsTask subclass,
    e.g. over local files). With `languages` (ISO 639-3 codes such as deu, or FLORES-200 codes such as
    deu_Latn), each task keeps the subsets all of whose languages are among them or English: German and
    English of FLORES, not German paired with its 200 other languages."""
    import importlib.util

    import mteb
    from mteb.abstasks.abstask import AbsTask

    tasks = []
    for spec in specs:
        if ":" in spec:
            path, class_name = spec.rsplit(":", 1)
            if not Path(path).is_file():
                raise ConfigError(f"--tasks {spec}: no file {path} (expected FILE.py:CLASS, an mteb task class)")
            module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as err:  # the user's own file: whatever it raises, it is one line naming it
                raise ConfigError(f"--tasks {spec}: importing {path} failed ({type(err).__name__}: {err})") from None
            task_class = getattr(module, class_name, None)
            if not (isinstance(task_class, type) and issubclass(task_class, AbsTask)):
                raise ConfigError(f"--tasks {spec}: {path} has no mteb task class {class_name!r} (a subclass of "
                                  f"mteb's AbsTask)")
            task = task_class()
        else:
            known = sorted(task.metadata.name for task in mteb.get_tasks())
            if spec not in known:
                close = difflib.get_close_matches(spec, known, n=2)
                raise ConfigError(f"--tasks {spec}: not an mteb task{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}"
                                  f"; mteb.get_tasks() lists them, and FILE.py:CLASS names a task of your own")
            task = mteb.get_task(spec)
        if languages:
            try:
                task = task.filter_languages([code.replace("_", "-") for code in [*languages, ENGLISH]],
                                             exclusive_language_filter=True)
            except ValueError:
                raise ConfigError(f"--languages {','.join(languages)}: {task.metadata.name} has none of them "
                                  f"(its subsets: {', '.join(task.hf_subsets[:8])}"
                                  f"{', ...' if len(task.hf_subsets) > 8 else ''})") from None
        tasks.append(task)
    return tasks


def load_task_data(tasks) -> None:
    """Each task's data, loaded before the model runs: a task that cannot be read is one line naming it."""
    for task in tasks:
        try:
            task.load_data()
        except Exception as err:  # datasets raises many kinds (offline, missing, gated); each is the same failure
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--tasks {task.metadata.name}: its data could not be loaded ({first_line}); mteb "
                              f"reads tasks from the Hugging Face hub: run where it is reachable, or where the "
                              f"datasets cache holds them") from None


def run_mteb(export: str, tasks, out: str, fallbacks: dict[str, str] | None = None, batch_size: int = 32) -> dict:
    """Evaluate a stage-1 export on mteb tasks (objects, data loaded or not); mteb's result files in OUT/results,
    OUT/summary.json and OUT/summary.md (each subset's main score, and the language each call was read as)."""
    import mteb

    from mtllm_train.export import load_embedder

    model = load_embedder(export, "mtllm mteb")
    fallbacks = fallbacks or {}
    for code, target in fallbacks.items():
        if model.config.languages and target not in model.config.languages:
            raise ConfigError(f"--fallback {code}={target}: {target!r} is not a language code of the MT tokenizer")
    check_tasks(tasks, set(model.config.languages), fallbacks)
    load_task_data(tasks)
    encoder = StackEncoder(model, tasks, fallbacks, batch_size)
    results = mteb.evaluate(encoder, tasks, cache=mteb.ResultCache(Path(out) / "results"),
                            overwrite_strategy="always", prediction_folder=Path(out) / "predictions",
                            encode_kwargs={"batch_size": batch_size},
                            show_progress_bar=False)
    rows = [{"task": task_result.task_name, "split": split, "subset": scores["hf_subset"],
             "main_score": scores["main_score"]}
            for task_result in results.task_results for split, per_subset in task_result.scores.items()
            for scores in per_subset]
    summary = {"model": str(export), "rows": rows, "read_as": encoder.read_as}
    lines = ["| task | split | subset | main score |", "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['split']} | {r['subset']} | {r['main_score']:.4f} |" for r in rows]
    write_atomic(Path(out) / "summary.json", json.dumps(summary, indent=1))
    write_atomic(Path(out) / "summary.md", f"MTEB scores of {export}\n\n" + "\n".join(lines) + "\n")
    return summary

"""The multilingual probe of stage 1: cross-lingual retrieval on bitext while the stack trains.

Stage 1 exists to let the LLM read other languages through the MT encoder, yet its loss is an English MSE. The
probe measures what the run is for, every `probe.every` steps and after the last: for each bitext set (lines of
language code, text in that language, its English translation) and each language, retrieval between the
language's sentences and the set's English sentences, in both directions (X -> English, English -> X), R@1 by
cosine, in two spaces:

    teacher   the stack reading X against the teacher (the LLM, adapters off) reading English: what stage 1 trains
    stack     the stack reading X against the stack reading English: what the exported embedder gives

Fields in metrics.jsonl (and W&B): probe_<space>_<x2en|en2x>_<lang> and probe_<space>_mean (over languages and
directions). The teacher's English vectors are computed once (the teacher is frozen). Each rank encodes its
share of the sentences, every rank the same number of micro-batches (padded with repeats), and one all-reduce
per side gathers them, so every rank computes the same numbers and agrees on the best step and early stop
without another collective. The best step by the `probe.select` space's mean is kept in RUN/probe_best.json;
the trainer saves a checkpoint there and pruning keeps it (`mtllm export --best` exports it).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from mtllm_train.config import Config, ConfigError
from mtllm_train.data.reader import padded_length
from mtllm_train.distributed import Dist, all_reduce
from mtllm_train.files import write_atomic
from mtllm_train.model.tokenizers import view_tokenizer
from mtllm_train.run_folder import RunFolder
from mtllm_train.portable.tokens import (ENGLISH, is_language_code, language_codes, pad_id, pad_right,
                                         set_source_language)
from mtllm_train.tasks.languages import resolve

SPACES = ("teacher", "stack")


@dataclass
class Bitext:
    """One probe set: per pair its language, text and the index of its English sentence in `english`."""

    name: str
    langs: list[str]
    texts: list[str]
    english_index: list[int]
    english: list[str]


def hub_flores_rows(spec: str) -> tuple[str, list[tuple[int, dict]]]:
    """(name, rows) of FLORES-200 on the hub, `hf://ORG/DATASET:SPLIT?langs=L1,L2[&sentences=N]` (e.g.
    hf://openlanguagedata/flores_plus:dev?langs=deu_Latn,swh_Latn): each language's configuration read with the
    `datasets` package, line-aligned with eng_Latn's, its first N sentences (default 200)."""
    from mtllm_train.tasks.data import hf_rows

    location, _, query = spec.partition("?")
    repo, _, split = location.removeprefix("hf://").partition(":")
    options = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    languages = [code for code in options.get("langs", "").split(",") if code]
    if not repo or not split or not languages or not options.get("sentences", "200").isdigit():
        raise ConfigError(f"probe.sets: {spec!r}: expected hf://ORG/DATASET:SPLIT?langs=L1,L2[&sentences=N], e.g. "
                          f"hf://openlanguagedata/flores_plus:dev?langs=deu_Latn,swh_Latn")
    sentences = int(options.get("sentences", "200"))

    def texts(code: str) -> list[str]:
        rows = hf_rows(f"hf://{repo}/{code}:{split}")
        return [str(row.get("text", row.get("sentence", ""))) for _, row in islice(rows, sentences)]

    english = texts(ENGLISH)
    rows = [{"lang": code, "text": text, "english": source} for code in languages
            for text, source in zip(texts(code), english)]
    return f"{repo.rsplit('/', 1)[-1]}_{split}", list(enumerate(rows, 1))


def read_bitext(path: str, mt_codes: set[str]) -> Bitext:
    """A probe set from jsonl ({"lang", "text", "english"} per line), tsv (lang, text, english) or parquet (those
    columns), or FLORES-200 from the hub (hub_flores_rows). Every problem is one line naming the file (and
    line); languages are FLORES-200 codes the MT tokenizer knows (stage 2's table), or, for an MT tokenizer
    without language codes (which reads every language alike, e.g. e5's), any well-formed one."""
    if path.startswith("hf://"):
        name, rows = hub_flores_rows(path)
        return _bitext(name, path, rows, mt_codes)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"probe.sets: {path!r} does not exist")
    rows = []
    try:
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise ConfigError(f"probe.sets: {path}:{number}: not valid JSON ({err})") from None
                    rows.append((number, record))
        elif file.suffix == ".tsv":
            with file.open(encoding="utf-8", newline="") as lines:
                for number, fields in enumerate(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                    if fields:
                        record = dict(zip(("lang", "text", "english"), fields)) if len(fields) == 3 else fields
                        rows.append((number, record))
        elif file.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = list(enumerate(pq.read_table(file).to_pylist(), 1))
        else:
            raise ConfigError(f"probe.sets: {path!r}: expected a .jsonl, .tsv or .parquet file")
    except UnicodeDecodeError as err:
        raise ConfigError(f"probe.sets: {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"probe.sets: {path}: cannot be read ({err})") from None
    return _bitext(file.stem, path, rows, mt_codes)


def _bitext(name: str, path: str, rows: list[tuple[int, object]], mt_codes: set[str]) -> Bitext:
    """The set from its numbered records, each checked."""
    bitext, english = Bitext(name, [], [], [], []), {}
    for number, record in rows:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k].strip()
                                                   for k in ("lang", "text", "english")):
            raise ConfigError(f"probe.sets: {path}:{number}: expected a language code, a text and its English "
                              f"translation (fields lang, text, english: non-empty strings)")
        try:
            lang = resolve(record["lang"], "flores", mt_codes) if mt_codes else record["lang"]
        except ConfigError as err:
            raise ConfigError(f"probe.sets: {path}:{number}: {err}") from None
        if not is_language_code(lang):
            raise ConfigError(f"probe.sets: {path}:{number}: language {lang!r} is not a FLORES-200 code "
                              f"(e.g. deu_Latn)")
        bitext.langs.append(lang)
        bitext.texts.append(record["text"].strip())
        bitext.english_index.append(english.setdefault(record["english"].strip(), len(english)))
    if not bitext.texts:
        raise ConfigError(f"probe.sets: {path}: no sentence pairs")
    bitext.english = list(english)
    for lang in dict.fromkeys(bitext.langs):
        targets = [e for code, e in zip(bitext.langs, bitext.english_index) if code == lang]
        if len(set(targets)) != len(targets):
            raise ConfigError(f"probe.sets: {path}: {lang} translates one English sentence twice; each language "
                              f"needs one translation per English sentence for retrieval")
    return bitext


def recall_at_1(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of queries whose most cosine-similar candidate is their target (candidates' row indices)."""
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    return (similarity.argmax(-1) == targets).float().mean().item()


def by_language(bitext: Bitext) -> dict[str, list[int]]:
    """Each language's pair indices, in file order."""
    rows: dict[str, list[int]] = {}
    for index, lang in enumerate(bitext.langs):
        rows.setdefault(lang, []).append(index)
    return rows


def retrieval_scores(bitext: Bitext, translated: dict[str, torch.Tensor], english: torch.Tensor) -> dict[str, float]:
    """R@1 both ways for each language of `translated` (its sentences' vectors, in file order) against the set's
    English vectors: {"x2en_<lang>": X -> English among all the set's English sentences, "en2x_<lang>": each of
    the English sentences it translates -> X among the language's sentences}."""
    scores = {}
    for lang, rows in by_language(bitext).items():
        vectors = translated[lang]
        targets = torch.tensor([bitext.english_index[k] for k in rows], device=vectors.device)
        scores[f"x2en_{lang}"] = recall_at_1(vectors, english, targets)
        scores[f"en2x_{lang}"] = recall_at_1(english[targets], vectors, torch.arange(len(rows), device=vectors.device))
    return scores


class BitextProbe:
    def __init__(self, cfg: Config, dist_info: Dist, run: RunFolder):
        self.cfg, self.dist_info, self.best_file = cfg, dist_info, run.probe_best_file
        self.mt_tokenizer = view_tokenizer(cfg.model, "mt")
        self.llm_tokenizer = view_tokenizer(cfg.model, "llm")
        mt_codes = language_codes(self.mt_tokenizer)
        self.sets = [read_bitext(path, mt_codes) for path in cfg.probe.sets]
        names = [bitext.name for bitext in self.sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"probe.sets: two sets are named alike ({', '.join(names)}); file names name them")
        self.teacher_english: dict[str, torch.Tensor] = {}  # the frozen teacher: once per set
        self.best = json.loads(self.best_file.read_text()) if self.best_file.is_file() else None

    def _language_key(self, bitext: Bitext, lang: str) -> str:
        return lang if len(self.sets) == 1 else f"{bitext.name}.{lang}"

    def _batches(self, texts: list[str], tokenizer) -> list[dict[str, torch.Tensor]]:
        """This rank's share of `texts` (every rank the same number of full micro-batches, repeats filling the
        last), padded as training pads them."""
        data, world = self.cfg.data, self.dist_info.world_size
        size = data.micro_batch_size
        per_rank = -(-len(texts) // (world * size)) * size
        share = list(range(self.dist_info.rank * per_rank, (self.dist_info.rank + 1) * per_rank))
        ids = tokenizer([texts[min(i, len(texts) - 1)] for i in share], truncation=True,
                        max_length=data.max_length)["input_ids"]
        batches = []
        for start in range(0, per_rank, size):
            chunk = ids[start:start + size]
            length = padded_length(max(len(row) for row in chunk), data.pad_multiple, data.max_length)
            input_ids, mask = pad_right(chunk, pad_id(tokenizer), length)
            batches.append({"rows": share[start:start + size], "ids": input_ids, "mask": mask})
        return batches

    def _encode(self, model, texts: list[str], tokenizer, view: str, device: torch.device, autocast) -> torch.Tensor:
        """Pooled vectors [len(texts), D] (fp32) of `view` ("mt": the stack; "llm": the teacher), on every rank."""
        vectors = None
        for batch in self._batches(texts, tokenizer):
            with autocast():
                out = model(**{f"{view}_input_ids": batch["ids"].to(device),
                               f"{view}_attention_mask": batch["mask"].to(device)})
            pooled = (out.student_pooled if view == "mt" else out.teacher_pooled).float()
            if vectors is None:
                vectors = torch.zeros(len(texts), pooled.shape[-1], device=device)
            rows = [row for row in batch["rows"] if row < len(texts)]  # repeats fill the last batch
            vectors[rows] = pooled[:len(rows)]  # each row is encoded by one rank; the all-reduce gathers them
        return all_reduce(vectors)

    def _stack_texts(self, model, texts: list[str], lang: str, device, autocast) -> torch.Tensor:
        set_source_language(self.mt_tokenizer, lang)
        return self._encode(model, texts, self.mt_tokenizer, "mt", device, autocast)

    @torch.no_grad()
    def run(self, model, device: torch.device, autocast) -> dict[str, float]:
        """R@1 per space, direction and language, and each space's mean; in eval mode, without gradients."""
        model.eval()
        record = {}
        for bitext in self.sets:
            if bitext.name not in self.teacher_english:
                self.teacher_english[bitext.name] = self._encode(model, bitext.english, self.llm_tokenizer, "llm",
                                                                 device, autocast)
            english = {"teacher": self.teacher_english[bitext.name],
                       "stack": self._stack_texts(model, bitext.english, ENGLISH, device, autocast)}
            translated = {lang: self._stack_texts(model, [bitext.texts[k] for k in rows], lang, device, autocast)
                          for lang, rows in by_language(bitext).items()}
            for space in SPACES:
                for name, value in retrieval_scores(bitext, translated, english[space]).items():
                    direction, lang = name.split("_", 1)
                    record[f"probe_{space}_{direction}_{self._language_key(bitext, lang)}"] = value
        model.train()
        for space in SPACES:
            values = [value for name, value in record.items() if name.startswith(f"probe_{space}_")]
            record[f"probe_{space}_mean"] = sum(values) / len(values)
        return record

    def update_best(self, step: int, record: dict) -> bool:
        """Whether `step` is the best so far by the selected space's mean R@1 (recorded in the run folder)."""
        value = record[f"probe_{self.cfg.probe.select}_mean"]
        if self.best is not None and value <= self.best["value"]:
            self.best["probes_since"] += 1
            improved = False
        else:
            self.best = {"step": step, "value": value, "space": self.cfg.probe.select, "probes_since": 0}
            improved = True
        if self.dist_info.is_main:
            write_atomic(self.best_file, json.dumps(self.best, indent=1))
        return improved

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best["step"]

    def should_stop(self) -> bool:
        patience = self.cfg.probe.patience
        return bool(patience) and self.best is not None and self.best["probes_since"] >= patience

    def early_stop_line(self, step: int, total_steps: int) -> str:
        best = self.best
        return (f"early stop at step {step}: the probe's mean R@1 ({best['space']}) has not improved on step "
                f"{best['step']}'s {best['value']:.3f} for {best['probes_since']} probes; {total_steps - step} steps "
                f"not run")


# The paper configs' probe: FLORES-200 dev in 24 languages, a spread of scripts, families and resource levels
# (high: German, French, Spanish, Russian, Chinese, Japanese, Arabic, Hindi; mid: Turkish, Vietnamese, Indonesian,
# Greek, Hebrew, Korean, Thai, Persian, Ukrainian; low: Swahili, Yoruba, Amharic, Nepali, Tamil, Quechua, Khmer).
FLORES_PROBE_LANGUAGES = ("deu_Latn", "fra_Latn", "spa_Latn", "rus_Cyrl", "zho_Hans", "jpn_Jpan", "arb_Arab",
                          "hin_Deva", "tur_Latn", "vie_Latn", "ind_Latn", "ell_Grek", "heb_Hebr", "kor_Hang",
                          "tha_Thai", "pes_Arab", "ukr_Cyrl", "swh_Latn", "yor_Latn", "amh_Ethi", "npi_Deva",
                          "tam_Taml", "quy_Latn", "khm_Khmr")


def flores_probe_set(flores_dir: str, out: str, languages: tuple[str, ...] = FLORES_PROBE_LANGUAGES,
                     split: str = "dev", sentences: int = 200) -> int:
    """A probe set from a FLORES-200 release folder (SPLIT/<code>.SPLIT files, line-aligned with eng_Latn's):
    the first `sentences` sentences of each language with their English. Returns the number of lines written."""
    folder = Path(flores_dir) / split

    def lines(code: str) -> list[str]:
        path = folder / f"{code}.{split}"
        if not path.is_file():
            raise ConfigError(f"--flores {flores_dir}: no {path.name} in {folder} (expected the FLORES-200 release "
                              f"layout: {split}/<code>.{split})")
        return path.read_text(encoding="utf-8").splitlines()[:sentences]

    english = lines(ENGLISH)
    rows = [json.dumps({"lang": code, "text": text, "english": source}, ensure_ascii=False)
            for code in languages for text, source in zip(lines(code), english)]
    write_atomic(Path(out), "\n".join(rows) + "\n")
    return len(rows)


# evaluate_embedder's rows: (name, how X is read, how English is read); stack = the export, teacher = the LLM
# alone on its own tokens, mt = the MT encoder alone (mean-pooled).
EMBEDDER_ROWS = (("MT-LLM (X and English by the stack)", "stack", "stack"),
                 ("MT-LLM X against the teacher's English", "stack", "teacher"),
                 ("the LLM alone reading X (baseline)", "teacher", "teacher"),
                 ("the MT encoder alone, mean-pooled (baseline)", "mt", "mt"))


def evaluate_embedder(export: str, sets: list[str], out: str) -> dict:
    """`mtllm evaluate-embedder`: per-language bitext mining of a stage-1 export against the two baselines;
    OUT.json and OUT.md. R@1 per language is the mean of both directions."""
    from mtllm_train.export import load_embedder

    model = load_embedder(export, "evaluate-embedder")
    teacher = model.teacher_tokenizer is not None and not model.config.merged

    def read(texts: list[str], lang: str, how: str) -> torch.Tensor:
        if how == "stack":
            return model.encode(texts, lang=lang)
        if how == "teacher":
            return model.encode_teacher(texts)
        return model.encode_mt_encoder(texts, lang=lang)

    codes = set(model.config.languages)
    table = {}
    for path in sets:
        bitext = read_bitext(path, codes)
        for name, x_side, english_side in EMBEDDER_ROWS:
            if "teacher" in (x_side, english_side) and not teacher:
                continue
            english = read(bitext.english, ENGLISH, english_side)
            translated = {lang: read([bitext.texts[k] for k in rows], lang, x_side)
                          for lang, rows in by_language(bitext).items()}
            scores = retrieval_scores(bitext, translated, english)
            row = table.setdefault(name, {})
            for lang in translated:
                row[f"{bitext.name}.{lang}" if len(sets) > 1 else lang] = {
                    "x2en": scores[f"x2en_{lang}"], "en2x": scores[f"en2x_{lang}"]}
    for row in table.values():
        row["mean"] = sum((v["x2en"] + v["en2x"]) / 2 for v in row.values()) / len(row)
    result = {"model": str(export), "sets": list(sets), "rows": table}
    languages = [key for key in next(iter(table.values())) if key != "mean"]
    names = list(table)
    lines = ["| language | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for lang in languages:
        lines.append(f"| {lang} | " + " | ".join(f"{(table[n][lang]['x2en'] + table[n][lang]['en2x']) / 2:.3f}"
                                              for n in names) + " |")
    lines.append("| mean | " + " | ".join(f"{table[n]['mean']:.3f}" for n in names) + " |")
    markdown = (f"Bitext retrieval R@1 (mean of X -> English and English -> X) of {export} on "
                f"{', '.join(sets)}\n\n" + "\n".join(lines) + "\n")
    write_atomic(Path(f"{out}.json"), json.dumps(result, indent=1))
    write_atomic(Path(f"{out}.md"), markdown)
    return result


def best_step(run: RunFolder) -> int:
    """The step a run's probe found best (`mtllm export --best`)."""
    path = run.probe_best_file
    if not path.is_file():
        raise ConfigError(f"--best: {run} has no probe record ({path.name}): the run trained without the "
                          f"multilingual probe (probe.every 0); give --step instead")
    return json.loads(path.read_text())["step"]

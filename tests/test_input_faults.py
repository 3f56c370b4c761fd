"""A user's mistake in a config override, a shard manifest or a `shards build` input answers with one line that
names the key or file and what was expected: no traceback, and nothing half-written."""

import gzip
import io
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtllm_train.__main__ import main
from mtllm_train.config import ConfigError, load_config
from mtllm_train.data.documents import read_documents
from mtllm_train.data.manifest import MANIFEST, load_manifest
from mtllm_train.data.shard_writer import build_shards

LLM_TOK, MT_TOK = "configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer"


@pytest.fixture(scope="module")
def built_shards(tmp_path_factory):
    """12 sample documents in 2 shards of 10 and 2."""
    tmp = tmp_path_factory.mktemp("faults")
    corpus = tmp / "docs.jsonl"
    with open("shards/sample/enwiki_sample.jsonl", encoding="utf-8") as lines:
        corpus.write_text("".join(line for _, line in zip(range(12), lines)), encoding="utf-8")
    build_shards([str(corpus)], str(tmp / "shards"), LLM_TOK, MT_TOK, "eng_Latn", 32, 10, 1, progress=False)
    return tmp / "shards"


def _cli_error(argv, capsys):
    """Run `mtllm ARGV`: it must exit 2 with exactly one stderr line, `mtllm: error: MESSAGE`; MESSAGE."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtllm: error: "), lines
    return lines[0].removeprefix("mtllm: error: ")


def override(text):
    """`mtllm config --config configs/tiny.yaml TEXT`."""
    return lambda tmp_path, capsys, request: _cli_error(["config", "--config", "configs/tiny.yaml", text], capsys)


def config_file(text):
    """`mtllm config --config FILE` of a YAML file holding `text`."""
    def run(tmp_path, capsys, request):
        (tmp_path / "c.yaml").write_text(text)
        return _cli_error(["config", "--config", str(tmp_path / "c.yaml")], capsys)
    return run


def manifest(change):
    """load_manifest of a built shard folder whose manifest.json was changed: `change` is the file's new bytes,
    or a function that edits the parsed manifest in place."""
    def run(tmp_path, capsys, request):
        folder = tmp_path / "shards"
        shutil.copytree(request.getfixturevalue("built_shards"), folder)
        if isinstance(change, bytes):
            (folder / MANIFEST).write_bytes(change)
        else:
            data = json.loads((folder / MANIFEST).read_text())
            change(data)
            (folder / MANIFEST).write_text(json.dumps(data))
        with pytest.raises(ConfigError) as info:
            load_manifest(folder)
        return str(info.value)
    return run


def shards_build(name, content, compress=True):
    """`mtllm shards build --input NAME` of a file holding `content` (bytes, gzipped for a .gz name unless
    compress=False); the output folder must hold no shard, not even a partial one."""
    def run(tmp_path, capsys, request):
        path, out = tmp_path / name, tmp_path / "out"
        path.write_bytes(gzip.compress(content) if name.endswith(".gz") and compress else content)
        message = _cli_error(["shards", "build", "--input", str(path), "--out", str(out), "--llm-tokenizer", LLM_TOK,
                              "--mt-tokenizer", MT_TOK, "--max-length", "32", "--shard-size", "10"], capsys)
        assert [p.name for pattern in ("*.tar", "*.partial", "*.tmp") for p in out.rglob(pattern)] == []
        return message
    return run


def task_file(name, content):
    """A stage-2 task file `name` holding `content` (bytes), read for the sentiment task (labels neg, pos)."""
    def run(tmp_path, capsys, request):
        from mtllm_train.tasks.data import read_task_file

        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError) as info:
            read_task_file(tmp_path / name, "sentiment", ("neg", "pos"))
        return str(info.value)
    return run


def _parquet(table):
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _shard_name(name):
    return lambda m: m["shards"][1].update(name=name)


GOOD_LINE = b'{"text": "A fine first document."}\n'
MANY_LINES = b"".join(b'{"text": "Document %d of %d."}\n' % (k, k * k) for k in range(2000))
BETAS = r"optim\.betas: expected two numbers in \[0, 1\), got "
MANIFEST_AT = r"^\S+/shards/manifest\.json: "
OUTSIDE = r"'shards\[1\]\.name' must be a file name in the shard folder, got "

# id: (what the user does, the one-line message it answers with: a regex)
CASES = {
    "deepspeed-bf16-on-cpu": (lambda tmp_path, capsys, request: _cli_error(
        ["train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", "distributed.backend=deepspeed",
         "distributed.mixed_precision=bf16"], capsys) if not torch.cuda.is_available() else pytest.skip("a GPU here"),
        r"^distributed\.mixed_precision: bf16 with DeepSpeed needs GPUs \(this process runs on cpu\); use none$"),
    "run-name-empty": (override("run.name="), r"^run\.name: expected a folder name inside run\.dir \(no '/'\), got ''$"),
    "run-name-escapes": (override("run.name=../../x"), r"^run\.name: expected a folder name inside run\.dir"),
    "lora-alpha-zero": (override("model.lora.alpha=0"),
                        r"^model\.lora\.alpha: expected a positive value \(the adapters' scale is alpha / r\), got 0$"),
    "config-base-not-a-path": (config_file("base: 5\n"), r"base: expected the path of another config file, got 5$"),
    "config-key-not-a-name": (config_file("train:\n  on: 3\n"),
                              r"^config key train\.True: expected a name \(quote it in YAML\), got bool$"),
    "override-not-yaml": (override("optim.betas=[0.9"),
                          r"^override 'optim\.betas=\[0\.9': the value is not valid YAML \(expected ',' or '\]', "
                          r"but got '<stream end>'\)$"),
    "betas-out-of-range": (override("optim.betas=[2,3]"), BETAS + r"\[2, 3\]$"),
    "betas-one-number": (override("optim.betas=[0.9]"), BETAS + r"\[0\.9\]$"),
    "betas-not-numbers": (override("optim.betas=[a, b]"), BETAS + r"\['a', 'b'\]$"),
    "lr-nan": (override("optim.lr=.nan"), r"^optim\.lr: expected a finite number, got nan$"),
    "lr-inf": (override("optim.lr=.inf"), r"^optim\.lr: expected a finite number, got inf$"),
    "warmup-nan": (override("optim.warmup=.nan"), r"^optim\.warmup: expected a finite number, got nan$"),
    "lora-dropout-nan": (override("model.lora.dropout=.nan"),
                         r"^model\.lora\.dropout: expected a finite number, got nan$"),
    "validate-every-inf": (override("task.validate_every=.inf"),
                           r"^task\.validate_every: expected a finite number, got inf$"),
    "timeout-zero": (override("distributed.timeout_minutes=0"),
                     r"^distributed\.timeout_minutes: expected a positive value, got 0$"),
    "timeout-negative": (override("distributed.timeout_minutes=-5"),
                         r"^distributed\.timeout_minutes: expected a positive value, got -5$"),
    "weight-decay-negative": (override("optim.weight_decay=-0.1"),
                              r"^optim\.weight_decay: expected a value >= 0, got -0\.1$"),
    "weight-decay-nan": (override("optim.weight_decay=.nan"),
                         r"^optim\.weight_decay: expected a finite number, got nan$"),
    "grad-clip-negative": (override("train.grad_clip=-1"), r"^train\.grad_clip: expected a value >= 0, got -1\.0$"),
    "grad-clip-nan": (override("train.grad_clip=.nan"), r"^train\.grad_clip: expected a finite number, got nan$"),
    "manifest-not-json": (manifest(b'{"format_version": 1, "shards": ['),
                          MANIFEST_AT + r"not valid JSON \(Expecting value: line 1 column 34 \(char 33\)\)"),
    "manifest-not-utf8": (manifest(b'{"format_version": "\xe9"}'),
                          MANIFEST_AT + r"not valid JSON \('utf-8' codec can't decode byte 0xe9 in position 20"),
    "manifest-no-pad-id": (manifest(lambda m: m["tokenizers"]["llm"].pop("pad_id")),
                           MANIFEST_AT + r"'tokenizers\.llm\.pad_id' is missing \(expected an integer\)"),
    "manifest-no-shards": (manifest(lambda m: m.pop("shards")),
                           MANIFEST_AT + r"'shards' is missing \(expected a list\)"),
    "manifest-no-max-length": (manifest(lambda m: m.pop("max_length")),
                               MANIFEST_AT + r"'max_length' is missing \(expected an integer\)"),
    "manifest-max-length-text": (manifest(lambda m: m.update(max_length="32")),
                                 MANIFEST_AT + r"'max_length' must be an integer, got '32'"),
    "shard-no-name": (manifest(lambda m: m["shards"][0].pop("name")),
                      MANIFEST_AT + r"'shards\[0\]\.name' is missing \(expected a string\)"),
    "shard-no-samples": (manifest(lambda m: m["shards"][1].pop("samples")),
                         MANIFEST_AT + r"'shards\[1\]\.samples' is missing \(expected an integer\)"),
    "shard-no-sha256": (manifest(lambda m: m["shards"][1].pop("sha256")),
                        MANIFEST_AT + r"'shards\[1\]\.sha256' is missing \(expected a string\)"),
    "shard-samples-null": (manifest(lambda m: m["shards"][0].update(samples=None)),
                           MANIFEST_AT + r"'shards\[0\]\.samples' must be an integer, got None"),
    "shard-not-an-object": (manifest(lambda m: m["shards"].append("shard-000002.tar")),
                            MANIFEST_AT + r"'shards\[2\]' must be an object with name, samples, sha256, got "
                                          r"'shard-000002\.tar'"),
    "shard-name-parent": (manifest(_shard_name("../shard-000001.tar")), MANIFEST_AT + OUTSIDE + r"'\.\./shard-000001"),
    "shard-name-dotdot": (manifest(_shard_name("..")), MANIFEST_AT + OUTSIDE + r"'\.\.'$"),
    "shard-name-absolute": (manifest(_shard_name("/etc/passwd")), MANIFEST_AT + OUTSIDE + r"'/etc/passwd'$"),
    "shard-name-subfolder": (manifest(_shard_name("sub/shard-000001.tar")), MANIFEST_AT + OUTSIDE + r"'sub/"),
    "totals-disagree": (manifest(lambda m: m["totals"].update(samples=13)),
                        MANIFEST_AT + r"'totals\.samples' is 13, but the shards' samples add up to 12; "),
    "jsonl-not-utf8": (shards_build("bad.jsonl", GOOD_LINE + b'{"text": "caf\xe9"}\n'),
                       r"^\S+/bad\.jsonl:2: not UTF-8 text \(byte 0xe9\); convert the file to UTF-8$"),
    "jsonl-gz-not-utf8": (shards_build("bad.jsonl.gz", GOOD_LINE * 2 + b'{"text": "\xff"}\n'),
                          r"^\S+/bad\.jsonl\.gz:3: not UTF-8 text \(byte 0xff\)"),
    "txt-not-utf8": (shards_build("bad.txt", b"First document.\n\nSecond \xc3( document.\n"),
                     r"^\S+/bad\.txt:3: not UTF-8 text \(byte 0xc3\)"),
    "jsonl-lone-surrogate": (shards_build("bad.jsonl", GOOD_LINE + b'{"text": "Broken pair \\ud83d here."}\n'),
                             r"bad\.jsonl:2: 'text' holds a lone surrogate \('\\ud83d' at character 12\), which is not "
                             r"Unicode text; fix or drop that line$"),
    "jsonl-text-int": (shards_build("bad.jsonl", GOOD_LINE + b'{"text": 123}\n'),
                       r"^\S+/bad\.jsonl:2: 'text' must be a string, got int$"),
    "jsonl-text-list": (shards_build("bad.jsonl", b'{"text": ["a", "b"]}\n'),
                        r"^\S+/bad\.jsonl:1: 'text' must be a string, got list$"),
    "parquet-text-int": (shards_build("bad.parquet", _parquet(pa.table({"text": [1, 2]}))),
                         r"^\S+/bad\.parquet: column 'text' must hold strings, got int64$"),
    "jsonl-gz-cut-short": (shards_build("cut.jsonl.gz", gzip.compress(MANY_LINES)[:60], compress=False),
                           r"^\S+/cut\.jsonl\.gz:\d+: not a whole gzip file \(Compressed file ended"),
    "gz-not-gzip": (shards_build("plain.jsonl.gz", GOOD_LINE, compress=False),
                    r"^\S+/plain\.jsonl\.gz:1: not a whole gzip file \(Not a gzipped file"),
    "parquet-cut-short": (shards_build("cut.parquet", _parquet(pa.table({"text": ["a", "b"]}))[:300]),
                          r"^\S+/cut\.parquet: not a readable parquet file \("),
    "run-name-too-long": (override("run.name=" + "r" * 240), r"^run\.name: 240 bytes; a run name is at most 200 bytes"),
    "task-file-empty": (task_file("empty.jsonl", b"\n"), r"^task file '\S+/empty\.jsonl' holds no examples$"),
    "task-label-boolean": (task_file("bool.jsonl", b'{"text": "ok", "label": true}\n'),
                           r"^\S+/bool\.jsonl:1: label True is outside 0\.\.1$"),
    "task-file-bad-json": (task_file("bad.jsonl", b'{"text": "ok", "label": 1}\n{"text": "x", label: 0}\n'),
                           r"^\S+/bad\.jsonl:2: not valid JSON \(Expecting property name"),
    "task-file-not-utf8": (task_file("bad.jsonl", b'{"text": "caf\xe9", "label": 1}\n'),
                           r"^\S+/bad\.jsonl:1: not UTF-8 text \(byte 0xe9\)$"),
}


@pytest.mark.parametrize("action, message", CASES.values(), ids=CASES.keys())
def test_mistake_answers_with_one_line(action, message, tmp_path, capsys, request):
    line = action(tmp_path, capsys, request)
    assert "\n" not in line and re.search(message, line), line


def test_edge_values_that_stay_valid(tmp_path):
    """The refusals above stop at the boundary: 0 disables clipping and decay, a null text is an empty document."""
    cfg = load_config("configs/tiny.yaml", ["train.grad_clip=0", "optim.weight_decay=0", "optim.betas=[0, 0.999]"])
    assert (cfg.train.grad_clip, cfg.optim.weight_decay, cfg.optim.betas) == (0.0, 0.0, [0, 0.999])
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": "a", "text": null}\n{"id": "b", "text": "Some text."}\n', encoding="utf-8")
    assert list(read_documents([str(corpus)])) == [("a", ""), ("b", "Some text.")]
    # A spreadsheet's CSV starts with a byte-order mark: it is not part of the first column's name.
    from mtllm_train.tasks.data import read_task_file

    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nfine,pos\n".encode("utf-8"))
    assert read_task_file(tmp_path / "bom.csv", "sentiment", ("neg", "pos")) == [{"text": "fine", "label": 1}]

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import ROOT  # noqa: E402,F401  (one home for the repository's root; tests import it from here too)
from mtllm_train.config import load_config  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "tiny.yaml"

# A GPT-2 the size of the tiny Llama, sharing its tokenizer (the paper's GPT-2 setting, scaled down).
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 2000, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "n_positions": 1024, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(autouse=True)
def _root_cwd(monkeypatch):
    # Config paths (tokenizers, shards) are relative to the project root, as for a user of the CLI.
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    return load_config(TINY_CONFIG)


TEXTS = [
    "The river flows through the old town before it reaches the sea.",
    "Anarchism is a political philosophy that rejects involuntary hierarchy.",
    "Water boils at a lower temperature high in the mountains.",
    "She wrote three novels and a book of short stories.",
]


def tokenize_views(cfg, texts=TEXTS):
    """Both views of `texts` as the trainer gets them: the shard writer's tokenization, the reader's collate."""
    from mtllm_train.data.reader import collate
    from mtllm_train.data.views import ViewTokenizer
    from mtllm_train.portable.tokens import pad_id

    views = ViewTokenizer(cfg.model.llm_tokenizer, cfg.model.mt_tokenizer, "eng_Latn", cfg.data.max_length)
    samples = [{"llm": aligned.llm_ids, "mt": aligned.mt_ids} for aligned in map(views.views, texts)]
    return collate(samples, {"llm": pad_id(views.llm), "mt": pad_id(views.mt)})


def build_train_shards(out, n_docs=160, max_length=48, shard_size=10):
    """Shards of the first `n_docs` sample documents: 16 shards of 10 by default."""
    from mtllm_train.data.shard_writer import build_shards

    corpus = Path(out).with_suffix(".jsonl")
    with open(ROOT / "shards/sample/enwiki_sample.jsonl", encoding="utf-8") as lines:
        corpus.write_text("".join(line for _, line in zip(range(n_docs), lines)))
    build_shards([str(corpus)], str(out), "configs/tiny/llm_tokenizer", "configs/tiny/mt_tokenizer", "eng_Latn",
                 max_length, shard_size, 1, progress=False)
    return Path(out)


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    return build_train_shards(tmp_path_factory.mktemp("train_shards") / "shards")


def train_overrides(run_dir, shards, **extra):
    """The tiny config made small: micro batch 4, global batch 8, 16 steps, a checkpoint every 4."""
    values = {"run.dir": str(run_dir), "data.shards": str(shards), "data.max_length": 48,
              "data.micro_batch_size": 4, "train.global_batch_size": 8, "train.steps": 16, "checkpoint.every": 4,
              "logging.progress_bar": False, "data.length_group_batches": 4, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def trained_weights(run_dir, step=None):
    from mtllm_train.export import load_trained_stack

    stack, _, _ = load_trained_stack(Path(run_dir), step)
    return {name: p.detach().clone() for name, p in stack.named_parameters() if p.requires_grad}


def read_metrics(run_dir):
    """A run's metrics.jsonl as the project reads it (metrics.read_records)."""
    from mtllm_train.metrics import read_records

    return read_records(Path(run_dir) / "metrics.jsonl")


def preempt_at(monkeypatch, step):
    """Make the ranks agree on preemption at the `step`-th step boundary (as after a SIGTERM)."""
    from mtllm_train.loop import Preemption

    calls = {"n": 0}

    def agreed(self, device):
        calls["n"] += 1
        return calls["n"] == step

    monkeypatch.setattr(Preemption, "agreed", agreed)

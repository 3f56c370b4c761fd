"""`mtllm <command>` == `python -m mtllm_train <command>`.

Heavy imports (torch, transformers) happen inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> None:
    from mtllm_train.demo import run_demo

    run_demo(args.workdir)


def _tiny_tokenizers(args: argparse.Namespace) -> None:
    from mtllm_train.model.tiny_tokenizers import build_tiny_tokenizers

    llm_dir, mt_dir = build_tiny_tokenizers(args.corpus, args.out)
    print(f"wrote {llm_dir} and {mt_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtllm", description="Self-distillation training of MT-encoder + LLM stacks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    demo = commands.add_parser("demo", help="run the end-to-end demo on tiny models (CPU, no model hub)")
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes its files (default: runs/demo)")
    demo.set_defaults(func=_demo)

    tok = commands.add_parser("tiny-tokenizers", help="train the tiny demo/test tokenizers from an English jsonl")
    tok.add_argument("--corpus", default="shards/sample/enwiki_sample.jsonl", help="jsonl with a 'text' field")
    tok.add_argument("--out", default="configs/tiny", help="folder for llm_tokenizer/ and mt_tokenizer/")
    tok.set_defaults(func=_tiny_tokenizers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mtllm_train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"mtllm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mtllm <command>` == `python -m mtllm_train <command>`.

Heavy imports (torch, transformers) happen inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> None:
    from mtllm_train.demo import run_demo

    run_demo(args.workdir)


def _config(args: argparse.Namespace) -> None:
    from pathlib import Path

    import yaml

    from mtllm_train.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(Path(cfg.run.dir) / cfg.run.name if args.run_dir else yaml.safe_dump(to_dict(cfg), sort_keys=False), end="\n")


def _train(args: argparse.Namespace) -> int:
    """train (stage 1), task-train and task-distill (stage 2)."""
    from mtllm_train.config import load_config
    from mtllm_train.loop import NonFiniteError

    cfg = load_config(args.config, args.overrides)
    try:
        if args.command == "train":
            from mtllm_train.train import train

            summary = train(cfg)
        else:
            from mtllm_train.tasks.finetune import train_task

            summary = train_task(cfg, args.command)
    except NonFiniteError as err:
        print(f"mtllm: stopped: {err}", file=sys.stderr)
        return 1
    if summary["is_main"] and summary["losses"]:
        stage2 = args.command != "train"
        steps = f"steps {summary['start_step']} -> {summary['end_step']}"
        if stage2:
            steps += f" of {summary['total_steps']}"
        print(f"{steps}: loss {summary['losses'][0]:.4g} -> {summary['losses'][-1]:.4g}; run in {summary['run_dir']}"
              + (f" (then: mtllm evaluate --run {summary['run_dir']})" if stage2 else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    from mtllm_train.tasks.evaluation import evaluate_run

    for table in evaluate_run(args.run):
        print(table.read_text())


def _export(args: argparse.Namespace) -> None:
    from mtllm_train.export import export_run

    out = export_run(args.run, args.out or f"{args.run}/export", args.step)
    print(f"exported to {out}; load it with mtllm_train.export.load_mtllm({str(out)!r})")


def _prepare_llm2vec(args: argparse.Namespace) -> None:
    from mtllm_train.llm2vec import prepare_llm2vec

    out = prepare_llm2vec(args.out, args.base, args.adapter, args.dtype)
    print(f"merged the adapters into {args.base}; saved to {out} (set model.llm: {out})")


def _tiny_tokenizers(args: argparse.Namespace) -> None:
    from mtllm_train.model.tiny_tokenizers import build_tiny_tokenizers

    llm_dir, mt_dir = build_tiny_tokenizers(args.corpus, args.out)
    print(f"wrote {llm_dir} and {mt_dir}")


def _shards_build(args: argparse.Namespace) -> None:
    from mtllm_train.data.shard_writer import build_shards
    from mtllm_train.model.tokenizers import ENGLISH

    build_shards(args.input, args.out, args.llm_tokenizer, args.mt_tokenizer, args.mt_lang or ENGLISH, args.max_length,
                 args.shard_size, args.workers, args.text_field)


def _shards_inspect(args: argparse.Namespace) -> int:
    from mtllm_train.data.inspect_shards import inspect_shards

    return 1 if inspect_shards(args.dir, args.batch_size, args.group_batches) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtllm", description="Self-distillation training of MT-encoder + LLM stacks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    demo = commands.add_parser("demo", help="run the end-to-end demo on tiny models (CPU, no model hub)")
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes its files (default: runs/demo)")
    demo.set_defaults(func=_demo)

    shards = commands.add_parser("shards", help="build and inspect pre-tokenized shards")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True, metavar="<shards command>")
    build = shard_commands.add_parser("build", help="pre-tokenize documents into aligned webdataset shards")
    build.add_argument("--input", nargs="+", required=True, help="jsonl(.gz), parquet or txt files")
    build.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    build.add_argument("--llm-tokenizer", required=True, help="the LLM's tokenizer (folder or hub id)")
    build.add_argument("--mt-tokenizer", required=True, help="the MT encoder's tokenizer (folder or hub id)")
    build.add_argument("--mt-lang", default=None, help="source-language code of the MT view (default: English)")
    build.add_argument("--max-length", type=int, default=512, help="max tokens per view; both views cover the same text")
    build.add_argument("--shard-size", type=int, default=10_000, help="documents per shard (default 10000)")
    build.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    build.add_argument("--text-field", default="text", help="the text field/column of jsonl and parquet inputs")
    build.set_defaults(func=_shards_build)
    inspect = shard_commands.add_parser("inspect", help="counts, length histograms, padding efficiency, checksums")
    inspect.add_argument("dir", help="a shard folder with manifest.json")
    inspect.add_argument("--batch-size", type=int, default=8, help="micro batch size for the padding estimate")
    inspect.add_argument("--group-batches", type=int, default=16, help="batches per length-grouping buffer")
    inspect.set_defaults(func=_shards_inspect)

    config = commands.add_parser("config", help="print the resolved config (YAML + overrides, validated)")
    config.add_argument("--config", required=True, help="a YAML config")
    config.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    config.add_argument("--run-dir", action="store_true", help="print only the run folder (run.dir/run.name)")
    config.set_defaults(func=_config)

    train = commands.add_parser("train", help="stage-1 self-distillation (also under torchrun / deepspeed)")
    train.add_argument("--config", required=True, help="a YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same.
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    for name, text in (("task-train", "stage 2: fine-tune the LLM, the MT encoder or the stack with a task head"),
                       ("task-distill", "stage 2: distil the fine-tuned LLM's task representations into the stack")):
        task = commands.add_parser(name, help=text + " (also under torchrun / deepspeed)")
        task.add_argument("--config", required=True, help="a YAML config with a task section, e.g. configs/stage2/...")
        task.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        task.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        task.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="test the S-DEV / T-DEV checkpoints of a stage-2 run on every "
                                                    "language; write RUN/results/<row>.json and .md")
    evaluate.add_argument("--run", required=True, help="a task-train or task-distill run folder")
    evaluate.set_defaults(func=_evaluate)

    export = commands.add_parser("export", help="write a loadable MT-LLM (LoRA adapter, projection, manifest)")
    export.add_argument("--run", required=True, help="the run folder, e.g. runs/tiny")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    export.add_argument("--out", default=None, help="output folder (default: RUN/export)")
    export.set_defaults(func=_export)

    from mtllm_train.llm2vec import BASE

    llm2vec = commands.add_parser("prepare-llm2vec", help="merge LLM2Vec's MNTP + SimCSE adapters into the base, once")
    llm2vec.add_argument("--out", required=True, help="folder for the merged model (then model.llm: OUT)")
    llm2vec.add_argument("--base", default=BASE, help=f"base model (default {BASE})")
    llm2vec.add_argument("--adapter", action="append", default=None,
                         help="peft adapter to merge, in order; repeat the flag (default: the MNTP then the "
                              "unsup-SimCSE adapter of LLM2Vec-Meta-Llama-3-8B-Instruct)")
    llm2vec.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default bfloat16)")
    llm2vec.set_defaults(func=_prepare_llm2vec)

    tok = commands.add_parser("tiny-tokenizers", help="train the tiny demo/test tokenizers from an English jsonl")
    tok.add_argument("--corpus", default="shards/sample/enwiki_sample.jsonl", help="jsonl with a 'text' field")
    tok.add_argument("--out", default="configs/tiny", help="folder for llm_tokenizer/ and mt_tokenizer/")
    tok.set_defaults(func=_tiny_tokenizers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mtllm_train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as err:
        print(f"mtllm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`mtllm <command>` == `python -m mtllm_train <command>`.

Heavy imports (torch, transformers) happen inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

EXAMPLES = {
    "demo": ["mtllm demo"],
    "build": ["mtllm shards build --input data/*.jsonl --out shards/build/mine --llm-tokenizer configs/tiny/llm_tokenizer "
              "--mt-tokenizer configs/tiny/mt_tokenizer --max-length 256"],
    "inspect": ["mtllm shards inspect shards/build/mine"],
    "config": ["mtllm config --config configs/tiny.yaml train.steps=50", "mtllm config --config configs/tiny.yaml --run-dir"],
    "train": ["mtllm train --config configs/tiny.yaml data.shards=runs/demo/shards train.steps=50",
              "torchrun --nproc_per_node 8 -m mtllm_train train --config configs/stage1_nllb600m_llm2vec_llama3_8b.yaml"],
    "task-train": ["mtllm task-train --config configs/stage2/nusax_llm.yaml"],
    "task-distill": ["mtllm task-distill --config configs/stage2/nusax_stack_s1_s2.yaml"],
    "evaluate": ["mtllm evaluate --run runs/nusax_stack_s1_s2"],
    "aggregate": ["mtllm aggregate runs/nusax_stack_s1_s2_seed1 runs/nusax_stack_s1_s2_seed2 "
                  "runs/nusax_stack_s1_s2_seed3 --out results/nusax_stack_s1_s2"],
    "preflight": ["mtllm preflight --world-size 8 --config configs/stage1_nllb600m_llm2vec_llama3_8b.yaml train "
                  "run.name=try1"],
    "export": ["mtllm export --run runs/tiny --out exports/tiny", "mtllm export --run runs/tiny --out exports/tiny --force"],
    "predict": ['mtllm predict --model exports/tiny --lang deu_Latn "Ein Satz."',
                "mtllm predict --model exports/nusax --lang jav_Latn --input texts.jsonl"],
    "verify": ["mtllm verify exports/tiny"],
    "evaluate-embedder": ["mtllm evaluate-embedder --model exports/tiny --bitext shards/sample/bitext_probe.jsonl "
                          "--out exports/tiny_bitext"],
    "mteb": ["mtllm mteb --model exports/tiny --tasks FloresBitextMining --languages deu_Latn,swh_Latn --out exports/tiny_mteb",
             "mtllm mteb --model exports/tiny --tasks my_tasks.py:MyBitext --fallback pcm-Latn=eng_Latn"],
    "probe-set": ["mtllm probe-set --flores data/flores200_dataset --out data/flores200_dev_probe.jsonl"],
    "prepare-llm2vec": ["mtllm prepare-llm2vec --out models/llm2vec-llama3-8b"],
    "tiny-tokenizers": ["mtllm tiny-tokenizers"],
}
CONFIG_HELP = ("Settings come from the YAML file, then from key.sub=value overrides (written without dashes), e.g. "
               "train.steps=200 optim.lr=1e-4. Sections: run, model, data, train, optim, distributed, checkpoint, "
               "logging, and loss (stage 1) or task (stage 2); every key is in the README's configuration reference, and "
               "`mtllm config --config FILE` prints the resolved values.")


class _Parser(argparse.ArgumentParser):
    """argparse with close-match suggestions for commands and a hint for overrides written as options."""

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"[\w-]+", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        option = re.search(r"unrecognized arguments: --?([\w.]+\.[\w.]+)(=\S*)?", message)
        if option:
            message += (f"; settings are overrides written without dashes, key.sub=value (e.g. "
                        f"{option.group(1)}{option.group(2) or '=VALUE'})")
        super().error(message)


def _package_version() -> str:
    try:
        return version("mtllm-train")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _demo(args: argparse.Namespace) -> None:
    from mtllm_train.demo import run_demo

    run_demo(args.workdir, args.steps)


def _config(args: argparse.Namespace) -> None:
    from pathlib import Path

    import yaml

    from mtllm_train.config import TaskConfig, load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    settings = to_dict(cfg)
    # Each stage's section would only show defaults the other stage never reads.
    del settings["task" if cfg.task == TaskConfig() else "loss"]
    print(Path(cfg.run.dir) / cfg.run.name if args.run_dir else yaml.safe_dump(settings, sort_keys=False), end="\n")


def _train(args: argparse.Namespace) -> int:
    """train (stage 1), task-train and task-distill (stage 2)."""
    from pathlib import Path

    from mtllm_train.loop import RunStopped
    from mtllm_train.preflight import launch_problems
    from mtllm_train.run_folder import discard_if_unused

    cfg = launch_problems(args.config, args.overrides, args.command, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        if args.command == "train":
            from mtllm_train.train import train

            summary = train(cfg)
        else:
            from mtllm_train.tasks.finetune import train_task

            summary = train_task(cfg, args.command)
    except RunStopped as err:
        print(f"mtllm: stopped: {err}", file=sys.stderr)
        return 1
    except BaseException:
        if os.environ.get("RANK", "0") == "0":
            discard_if_unused(Path(cfg.run.dir) / cfg.run.name)  # refused before its first step: nothing left
        raise
    if summary["is_main"] and summary["losses"]:
        stage2 = args.command != "train"
        # Step numbers count completed optimizer steps everywhere (metrics.jsonl's "step" is the count after it).
        steps = f"steps {summary['start_step']} -> {summary['end_step']} of {summary['total_steps']}"
        if "passes" in summary:
            steps += f" ({summary['passes']:.2f} passes over the training data)"
        print(f"{steps}: loss {summary['losses'][0]:.4g} -> {summary['losses'][-1]:.4g}; run in {summary['run_dir']}"
              + (f" (then: mtllm evaluate --run {summary['run_dir']})" if stage2 else ""))
        if "probe_best" in summary:
            best = summary["probe_best"]
            print(f"probe: best mean R@1 ({best['space']}) {best['value']:.3f} at step {best['step']}"
                  + (f"; stopped early at step {summary['early_stopped']}" if "early_stopped" in summary else "")
                  + f" (mtllm export --run {summary['run_dir']} --best)")
    return 0


def _aggregate(args: argparse.Namespace) -> None:
    from mtllm_train.tasks.aggregate import aggregate

    aggregate(args.runs, args.out)
    print(open(f"{args.out}.md", encoding="utf-8").read(), end="")
    print(f"(written to {args.out}.json and {args.out}.md)")


def _preflight(args: argparse.Namespace) -> int:
    from mtllm_train.config import ConfigError
    from mtllm_train.preflight import preflight

    if args.world_size < 1:
        raise ConfigError(f"--world-size: expected a positive number of processes, got {args.world_size}")
    problems, notes = preflight(args.train_command, args.config, args.overrides, args.world_size)
    for line in problems:
        print(f"mtllm: error: {line}", file=sys.stderr)
    for line in notes:
        print(f"mtllm: {line}", file=sys.stderr)
    if problems:
        return 2
    print(f"preflight: {args.train_command} on {args.world_size} process(es) with {args.config}: ok", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    from mtllm_train.tasks.evaluation import evaluate_run

    for table in evaluate_run(args.run):
        print(table.read_text())


def _export(args: argparse.Namespace) -> None:
    from mtllm_train.config import ConfigError
    from mtllm_train.export import export_run
    from mtllm_train.probe import best_step
    from mtllm_train.run_folder import RunFolder

    if args.best and args.step is not None:
        raise ConfigError("mtllm export: give --step or --best, not both")
    step = best_step(RunFolder(args.run)) if args.best else args.step
    out = export_run(args.run, args.out, step, args.force, args.merge)
    print(f"exported to {out}; load it with mtllm_train.export.load_mtllm({str(out)!r}), transformers' AutoModel "
          f"(trust_remote_code=True), or try it: mtllm predict --model {out} TEXT")


def _predict(args: argparse.Namespace) -> None:
    import json

    from mtllm_train.export import load_mtllm
    from mtllm_train.predict import read_inputs

    model = load_mtllm(args.model)
    inputs = read_inputs(args.input, args.texts, model)
    if model.head is None:
        for vector in model.encode(inputs, lang=args.lang).tolist():
            print(json.dumps({"vector": [round(value, 6) for value in vector]}))
        return
    probabilities = model.predict_proba(inputs, lang=args.lang)  # per input [C], or [words, C] (a token task)
    def rounded(values):
        return [rounded(value) for value in values] if isinstance(values, list) else round(values, 6)

    for label, row in zip(model.predict(inputs, lang=args.lang), probabilities):
        print(json.dumps({"prediction": label, "probabilities": rounded(row.tolist())}))


def _verify(args: argparse.Namespace) -> int:
    from mtllm_train.export import verify_export

    report = verify_export(args.model)
    if report is None:
        print(f"{args.model}: records no reference outputs (made before exports checked themselves): it cannot be "
              f"verified; export the run again to add them", file=sys.stderr)
        return 1
    print(report.table())
    print(report.versions_line())
    if report.drifted:
        probe, deviation = report.worst()
        print(f"DRIFT: {probe['lang']} deviates by {deviation:.2e}, over the tolerance {report.tolerance:.0e}")
        return 1
    print("ok: every probe within the tolerance")
    return 0


def _probe_set(args: argparse.Namespace) -> None:
    from mtllm_train.probe import FLORES_PROBE_LANGUAGES, flores_probe_set

    languages = tuple(args.langs.split(",")) if args.langs else FLORES_PROBE_LANGUAGES
    written = flores_probe_set(args.flores, args.out, languages, args.split, args.sentences)
    print(f"wrote {written} sentence pairs to {args.out} (set probe.sets: [{args.out}])")


def _evaluate_embedder(args: argparse.Namespace) -> None:
    from mtllm_train.probe import evaluate_embedder

    evaluate_embedder(args.model, args.bitext, args.out)
    print(open(f"{args.out}.md", encoding="utf-8").read(), end="")
    print(f"(written to {args.out}.json and {args.out}.md)")


def _mteb(args: argparse.Namespace) -> None:
    from mtllm_train.config import ConfigError

    try:
        from mtllm_train.mteb_eval import find_tasks, run_mteb
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ("mteb", "datasets"):
            raise
        raise ConfigError("mtllm mteb needs the mteb package: pip install -e .[mteb] (mteb==2.26.24)") from None

    fallbacks = {}
    for pair in args.fallback:
        code, _, target = pair.partition("=")
        if not (code and target):
            raise ConfigError(f"--fallback {pair}: expected MTEB_CODE=FLORES_CODE, e.g. pcm-Latn=eng_Latn")
        fallbacks[code] = target
    languages = args.languages.split(",") if args.languages else None
    with warnings.catch_warnings():
        # mteb's and datasets' own notices (tensor copies, dataset revisions); the export's load check still warns
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(mteb|datasets)\b")
        run_mteb(args.model, find_tasks(args.tasks, languages), args.out, fallbacks, args.batch_size)
    print(Path(args.out, "summary.md").read_text(encoding="utf-8"), end="")
    print(f"(mteb's result files in {args.out}/results, predictions in {args.out}/predictions, the language each "
          f"call was read as in {args.out}/summary.json)")


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
    from mtllm_train.portable.tokens import ENGLISH

    build_shards(args.input, args.out, args.llm_tokenizer, args.mt_tokenizer, args.mt_lang or ENGLISH, args.max_length,
                 args.shard_size, args.workers, args.text_field)


def _shards_inspect(args: argparse.Namespace) -> int:
    from mtllm_train.data.inspect_shards import inspect_shards

    return 1 if inspect_shards(args.dir, args.batch_size, args.group_batches) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtllm", description="Self-distillation training of MT-encoder + LLM stacks. "
                                               "`mtllm <command> --help` describes each command with examples.")
    parser.add_argument("--version", action="version", version=f"mtllm-train {_package_version()}")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own progress bars and load "
                                                                "reports (also: MTLLM_VERBOSE=1)")
    # The deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add_parser = commands.add_parser

    def command(name: str, help: str, subcommands=None, config: bool = False):
        """A command with its one-line description and examples (and the config's story for config users)."""
        epilog = "\n".join(["examples:", *(f"  {line}" for line in EXAMPLES[name])])
        if config:
            epilog += "\n\n" + textwrap.fill(CONFIG_HELP, 100)
        return (subcommands or add_parser)(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)

    demo = command("demo", "run the end-to-end demo on tiny models (CPU, no model hub)")
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes its files (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: configs/tiny.yaml's 200)")
    demo.set_defaults(func=_demo)

    shards = add_parser("shards", help="build and inspect pre-tokenized shards", description="Build and inspect "
                        "pre-tokenized shards: `mtllm shards build --help`, `mtllm shards inspect --help`.")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True, metavar="<shards command>")
    build = command("build", "pre-tokenize documents into aligned webdataset shards", shard_commands.add_parser)
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
    inspect = command("inspect", "counts, length histograms, padding efficiency, checksums", shard_commands.add_parser)
    inspect.add_argument("dir", help="a shard folder with manifest.json")
    inspect.add_argument("--batch-size", type=int, default=8, help="micro batch size for the padding estimate")
    inspect.add_argument("--group-batches", type=int, default=16, help="batches per length-grouping buffer")
    inspect.set_defaults(func=_shards_inspect)

    config = command("config", "print the resolved config (YAML + overrides, validated)", config=True)
    config.add_argument("--config", required=True, help="a YAML config")
    config.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    config.add_argument("--run-dir", action="store_true", help="print only the run folder (run.dir/run.name)")
    config.set_defaults(func=_config)

    train = command("train", "stage-1 self-distillation (also under torchrun / deepspeed)", config=True)
    train.add_argument("--config", required=True, help="a YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train.set_defaults(func=_train)

    for name, text in (("task-train", "stage 2: fine-tune the LLM, the MT encoder or the stack with a task head"),
                       ("task-distill", "stage 2: distil the fine-tuned LLM's task representations into the stack")):
        task = command(name, text + " (also under torchrun / deepspeed)", config=True)
        task.add_argument("--config", required=True, help="a YAML config with a task section, e.g. configs/stage2/...")
        task.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        task.set_defaults(func=_train)

    aggregate = command("aggregate", "the paper's table over seeds: mean and std over evaluated runs of one row, per "
                                     "language and of the average (OUT.json, OUT.md)")
    aggregate.add_argument("runs", nargs="+", help="stage-2 run folders of one row (one per seed), each evaluated")
    aggregate.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    aggregate.set_defaults(func=_aggregate)

    preflight = command("preflight", "check what a launch on N processes would refuse, before it is queued (the "
                                     "launch scripts run it)", config=True)
    preflight.add_argument("train_command", choices=("train", "task-train", "task-distill"), metavar="COMMAND",
                           help="train, task-train or task-distill")
    preflight.add_argument("--world-size", type=int, required=True, help="the processes the launch will start")
    preflight.add_argument("--config", required=True, help="YAML config file")
    preflight.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    preflight.set_defaults(func=_preflight)

    evaluate = command("evaluate", "test the S-DEV / T-DEV checkpoints of a stage-2 run on every language; write "
                                   "RUN/results/<row>.json and .md")
    evaluate.add_argument("--run", required=True, help="a task-train or task-distill run folder")
    evaluate.set_defaults(func=_evaluate)

    export = command("export", "write a loadable MT-LLM (embedder or task model) with its model card")
    export.add_argument("--run", required=True, help="the run folder, e.g. runs/tiny")
    export.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the newest; a stage-2 run: its S-DEV checkpoint)")
    export.add_argument("--out", default=None, help="a new or empty folder (default: RUN/export)")
    export.add_argument("--best", action="store_true", help="the checkpoint the multilingual probe found best "
                                                            "(stage 1 with probe.every)")
    export.add_argument("--force", action="store_true", help="replace an earlier export in --out (nothing else)")
    export.add_argument("--merge", action="store_true", help="merge the LoRA into the LLM (bfloat16; no peft needed)")
    export.set_defaults(func=_export)

    predict = command("predict", "predictions (task model) or vectors (embedder) of an export")
    predict.add_argument("--model", required=True, help="an export folder (mtllm export) or a hub id")
    predict.add_argument("--lang", default=None, help="the texts' language, a FLORES-200 code (default: English)")
    predict.add_argument("--input", default=None, help="a jsonl file: one object per input with the task's fields "
                                                       "(text; premise + hypothesis; passage + question + answers)")
    predict.add_argument("texts", nargs="*", help="texts to read (single-text models: embedders, sentiment; a token "
                                                  "model labels each white-space-separated word)")
    predict.set_defaults(func=_predict)

    probe_set = command("probe-set", "a multilingual probe set (probe.sets) from a FLORES-200 release folder")
    probe_set.add_argument("--flores", required=True, help="the FLORES-200 folder (holding dev/ and devtest/)")
    probe_set.add_argument("--out", required=True, help="the jsonl to write")
    probe_set.add_argument("--langs", default=None, help="comma-separated FLORES-200 codes (default: 24 languages "
                                                         "across scripts and resource levels)")
    probe_set.add_argument("--split", default="dev", help="dev (default) or devtest")
    probe_set.add_argument("--sentences", type=int, default=200, help="sentences per language (default 200)")
    probe_set.set_defaults(func=_probe_set)

    embedder = command("evaluate-embedder", "bitext retrieval per language of a stage-1 export, beside the LLM alone "
                                            "and the MT encoder alone")
    embedder.add_argument("--model", required=True, help="a stage-1 export folder (mtllm export) or a hub id")
    embedder.add_argument("--bitext", required=True, action="append",
                          help="a bitext set (jsonl / tsv / parquet: lang, text, english); repeat for more")
    embedder.add_argument("--out", default="embedder_eval", help="OUT.json and OUT.md (default embedder_eval)")
    embedder.set_defaults(func=_evaluate_embedder)

    mteb = command("mteb", "MTEB tasks (the mteb library) on a stage-1 export, each text read in its subset's language")
    mteb.add_argument("--model", required=True, help="a stage-1 export folder (mtllm export) or a hub id")
    mteb.add_argument("--tasks", required=True, nargs="+",
                      help="mteb task names (e.g. FloresBitextMining Tatoeba), or FILE.py:CLASS for a task of your own")
    mteb.add_argument("--languages", default=None,
                      help="comma-separated languages (deu or deu_Latn): keep the subsets all of whose languages are "
                           "among them (English too in bitext and STS tasks; default: every subset)")
    mteb.add_argument("--fallback", action="append", default=[],
                      help="MTEB_CODE=FLORES_CODE for a language the MT encoder lacks (e.g. pcm-Latn=eng_Latn); repeat")
    mteb.add_argument("--out", default="mteb_results", help="output folder (default mteb_results)")
    mteb.add_argument("--batch-size", type=int, default=32, help="texts per forward (default 32)")
    mteb.set_defaults(func=_mteb)

    verify = command("verify", "check that an export computes what it recorded when exported (exit 1 if not)")
    verify.add_argument("model", help="an export folder (mtllm export) or a hub id")
    verify.set_defaults(func=_verify)

    from mtllm_train.llm2vec import BASE

    llm2vec = command("prepare-llm2vec", "merge LLM2Vec's MNTP + SimCSE adapters into the base, once")
    llm2vec.add_argument("--out", required=True, help="folder for the merged model (then model.llm: OUT)")
    llm2vec.add_argument("--base", default=BASE, help=f"base model (default {BASE})")
    llm2vec.add_argument("--adapter", action="append", default=None,
                         help="peft adapter to merge, in order; repeat the flag (default: the MNTP then the "
                              "unsup-SimCSE adapter of LLM2Vec-Meta-Llama-3-8B-Instruct)")
    llm2vec.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default bfloat16)")
    llm2vec.set_defaults(func=_prepare_llm2vec)

    tok = command("tiny-tokenizers", "train the tiny demo/test tokenizers from an English jsonl")
    tok.add_argument("--corpus", default="shards/sample/enwiki_sample.jsonl", help="jsonl with a 'text' field")
    tok.add_argument("--out", default="configs/tiny", help="folder for llm_tokenizer/ and mt_tokenizer/")
    tok.set_defaults(func=_tiny_tokenizers)
    return parser


# What stays safe when a command stops on a file-system error (a full disk, a read-only folder), by command.
AFTER_FILE_ERROR = {
    "train": (1, "a rerun of the same command resumes from the newest checkpoint"),
    "task-train": (1, "a rerun of the same command resumes from the newest checkpoint"),
    "task-distill": (1, "a rerun of the same command resumes from the newest checkpoint"),
    "shards": (2, "the complete shards are kept: a rerun of the same command finishes the build"),
    "export": (2, "nothing was left at --out (an export is written beside it and moved into place when whole)"),
}


def _quiet_libraries() -> None:
    """The console carries the run's own lines: transformers' weight-loading bars and load reports, the hub's
    download bars and torchao's notices only with --verbose (their errors still raise)."""
    import logging

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    logging.getLogger("torchao").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from mtllm_train.config import ConfigError
    from mtllm_train.portable.tokens import InputError

    args = build_parser().parse_args(argv)
    # A warning (an export's load check, a library's notice) is one line on the console, like an error.
    warnings.formatwarning = lambda message, category, *_: f"mtllm: warning: {message}\n"
    if not (args.verbose or os.environ.get("MTLLM_VERBOSE") == "1") and args.command != "config":
        _quiet_libraries()
    try:
        return args.func(args) or 0
    except (ConfigError, InputError) as err:
        # A mistake every rank of a launch finds alike (the config) is said once, by rank 0.
        if not (getattr(err, "same_on_every_rank", False) and os.environ.get("RANK", "0") != "0"):
            print(f"mtllm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        code, safe = AFTER_FILE_ERROR.get(args.command, (2, ""))
        where = f"{err.filename}: " if err.filename else ""
        print(f"mtllm: error: {where}{err.strerror or err}" + (f"; {safe}" if safe else ""), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("mtllm: interrupted; a training run resumes from its newest checkpoint when the same command runs "
              "again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`mtllm preflight`: what a launch would refuse, found before anything is queued or spawned.

The launch scripts run it with the world size they are about to start (and `--dry-run` too): the config and its
overrides, the backend and batch geometry for that world size, the run folder (another kind of run, settings or
world size its checkpoints do not take, a trainer holding it), the shards' manifests and tokenizers, the probe sets,
a stage-2 run's task files, and W&B when it is online. Every problem is one line; none is found by the ranks.
"""

from __future__ import annotations

from collections.abc import Callable

from mtllm_train.config import Config, ConfigError, TaskConfig, accumulation_steps, check_backend, load_config


def _run_folder(cfg: Config, command: str, world_size: int) -> None:
    from pathlib import Path

    from mtllm_train.checkpoint import Checkpoints
    from mtllm_train.run_folder import RunFolder, check_resume_settings

    run = RunFolder(Path(cfg.run.dir) / cfg.run.name)
    identity = run.identity()
    if command == "train" and identity is not None:
        raise ConfigError(f"run folder {run} holds a stage-2 run; give this stage-1 run its own run.name")
    if command != "train" and identity is None and run.config_file.is_file():
        raise ConfigError(f"run folder {run} holds a stage-1 run; give this stage-2 run its own run.name")
    check_resume_settings(cfg, run)
    complete = Checkpoints(run.path).complete()
    if complete:
        meta = Checkpoints(run.path).meta()
        if meta.get("world_size", world_size) != world_size:
            raise ConfigError(f"checkpoint {complete[-1][1]} was written by {meta['world_size']} ranks, this launch "
                              f"starts {world_size}: resume with {meta['world_size']} (or start a new run.name)")
        if meta.get("backend", cfg.distributed.backend) != cfg.distributed.backend:
            raise ConfigError(f"checkpoint {complete[-1][1]} was written with distributed.backend "
                              f"{meta['backend']!r}, this launch uses {cfg.distributed.backend!r}")


def _holder(cfg: Config) -> None:
    from pathlib import Path

    from mtllm_train.run_folder import RunFolder, in_use_line, lock_holder

    run = RunFolder(Path(cfg.run.dir) / cfg.run.name)
    holder = lock_holder(run)
    if holder is not None:
        raise ConfigError(in_use_line(run, holder))


def _shards(cfg: Config) -> None:
    from mtllm_train.data.manifest import check_tokenizers, load_manifest
    from mtllm_train.model.tokenizers import run_tokenizers

    tokenizers = run_tokenizers(cfg.model)
    for shards in [cfg.data.shards] + ([cfg.data.eval_shards] if cfg.data.eval_every else []):
        check_tokenizers(load_manifest(shards), shards, *tokenizers)


def _probe_sets(cfg: Config) -> None:
    from mtllm_train.model.tokenizers import view_tokenizer
    from mtllm_train.portable.tokens import language_codes
    from mtllm_train.probe import read_bitext

    codes = language_codes(view_tokenizer(cfg.model, "mt"))
    for path in cfg.probe.sets:
        read_bitext(path, codes)


def _task_files(cfg: Config, command: str) -> None:
    from mtllm_train.tasks.encode import TaskData
    from mtllm_train.tasks.evaluation import eval_languages, read_every_split
    from mtllm_train.tasks.finetune import check_task_config

    check_task_config(cfg, command)
    data = TaskData(cfg)
    data.split(cfg.task.train)
    read_every_split(data, eval_languages(cfg, data.tokenizers["mt"]))


def _wandb(cfg: Config) -> str | None:
    from mtllm_train.metrics import wandb_mode

    return wandb_mode(cfg.logging)[1]


def launch_problems(config: str, overrides: list[str], command: str, world_size: int) -> Config:
    """The config, with what every rank of a launch would find alike (the file, its values, the sections the
    command reads, the backend and batch geometry for the world size): a ConfigError marked `same_on_every_rank`,
    so that only rank 0 says it."""
    try:
        cfg = load_config(config, overrides)
        stage_sections(cfg, command)
        check_backend(cfg.distributed.backend, world_size)
        accumulation_steps(cfg, world_size)
    except ConfigError as err:
        err.same_on_every_rank = True
        raise
    return cfg


def stage_sections(cfg: Config, command: str) -> None:
    """A section the command does not read is refused, not ignored: task.* on stage 1."""
    if command == "train" and cfg.task != TaskConfig():
        changed = [name for name, value in vars(cfg.task).items() if value != getattr(TaskConfig(), name)]
        raise ConfigError(f"task.{changed[0]}: stage 1 (mtllm train) does not read the task section; set task.* "
                          f"for task-train / task-distill (to start stage 1 from another run: train.init_from)")


def preflight(command: str, config: str, overrides: list[str], world_size: int) -> tuple[list[str], list[str]]:
    """(problems, notes): what a launch of `command` on `world_size` processes would refuse, one line each, and
    what it would say (W&B falling back to offline)."""
    cfg = load_config(config, overrides)  # a config that does not load stops here, as one problem
    checks: list[Callable[[], None]] = [lambda: stage_sections(cfg, command),
                                        lambda: check_backend(cfg.distributed.backend, world_size),
                                        lambda: accumulation_steps(cfg, world_size),
                                        lambda: _run_folder(cfg, command, world_size), lambda: _holder(cfg)]
    if command == "train":
        checks += [lambda: _shards(cfg), lambda: _probe_sets(cfg)]
    else:
        checks.append(lambda: _task_files(cfg, command))
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems.append(str(err))
    note = _wandb(cfg) if not problems else None
    return problems, [note] if note else []

"""The models of stage 2: a body, its task representation, and the task head.

kinds of body:
- llm:        the LLM + a new task LoRA on the LLM's own tokenization (task-train; the task-distill teacher)
- mt_encoder: the MT encoder + LoRA on the MT tokenization (the "MT encoder alone" baseline)
- stack:      the stage-1 stack on the MT tokenization: its stage-1 LoRA continues (the paper), or, with
              task.stage1_lora merge (the authors' released model), is merged into the frozen LLM under a fresh
              task LoRA; the projection U stays as stage 1 left it (stage 2 trains only LoRA adapters)

The task representation is the pooled vector (model.pooling) or, for multiple choice and token classification,
each answer's or word's own span mean-pooled (portable/heads.span_pool). In task-distill the stack's
representation is pulled towards the teacher's (MSE), and the teacher's head, frozen, predicts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, stored_quantization
from mtllm_train.files import atomic_path
from mtllm_train.model.loading import build_llm, build_mt_encoder, seeded
from mtllm_train.portable.pooling import pool
from mtllm_train.model.stack import add_lora, build_stack, lora_train_mode, trainable_parameters
from mtllm_train.tasks.data import label_names
from mtllm_train.portable.format import task_head, task_shape
from mtllm_train.portable.heads import span_pool
from mtllm_train.run_folder import RunFolder

VIEW_OF = {"llm": "llm", "mt_encoder": "mt", "stack": "mt"}


class TaskModel(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module, kind: str, pooling: str):
        super().__init__()
        self.body, self.head, self.kind, self.pooling = body, head, kind, pooling
        self.teacher: TaskModel | None = None  # task-distill without a cache: the frozen fine-tuned LLM

    @property
    def view(self) -> str:
        """Which tokenization the body reads: 'llm' or 'mt'."""
        return VIEW_OF[self.kind]

    def train(self, mode: bool = True) -> TaskModel:
        """Frozen parts stay in eval mode; LoRA dropout follows `mode`; the teacher is always in eval mode."""
        self.training = mode
        self.head.train(mode)
        if self.kind == "stack":
            self.body.train(mode)
        else:
            lora_train_mode(self.body, mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def representation(self, input_ids, attention_mask, span_masks=None) -> torch.Tensor:
        if self.kind == "stack":
            hidden = self.body.student_hidden(input_ids, attention_mask)
        else:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if span_masks is not None:
            return span_pool(hidden, span_masks)
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, span_masks=None, teacher_input_ids=None,
                teacher_attention_mask=None, teacher_span_masks=None):
        """(representation, logits, teacher representation or None): one call, so the DDP / FSDP / DeepSpeed
        wrappers see a single forward."""
        representation = self.representation(input_ids, attention_mask, span_masks)
        teacher_representation = None
        if self.teacher is not None and teacher_input_ids is not None:
            with torch.no_grad():
                teacher_representation = self.teacher.representation(teacher_input_ids, teacher_attention_mask,
                                                                      teacher_span_masks)
        return representation, self.head(representation), teacher_representation

    def backend_parts(self) -> tuple[nn.Module, list[nn.Module]]:
        """(the module whose layers FSDP shards, the frozen modules every rank keeps whole)."""
        frozen = [self.teacher] if self.teacher is not None else []
        if self.kind == "stack":
            return self.body.llm, [self.body.mt_encoder, *frozen]
        return self.body, frozen


def num_classes(cfg: Config) -> int:
    if task_shape(cfg.task.name) == "choice":
        return cfg.task.choices  # one score per answer
    names = label_names(cfg.task)
    if len(names) < 2:
        raise ConfigError(f"task.labels: a {cfg.task.name} task needs at least two label names, got {cfg.task.labels}")
    return len(names)


def build_task_model(cfg: Config, kind: str, device: torch.device | str = "cpu") -> TaskModel:
    """The task model built on `device` (see load_model), with the same seed for every random init (inline
    models, LoRA, head) on every rank."""
    with seeded(cfg.model.init_seed, device):
        if kind == "stack":
            body = build_stack(cfg.model, device)
            body.projection.requires_grad_(False)
            hidden = body.llm.config.hidden_size
        elif kind == "llm":
            body = add_lora(build_llm(cfg.model, device), cfg.model)
            hidden = body.config.hidden_size
        else:
            body = add_lora(build_mt_encoder(cfg.model, device), cfg.model)
            hidden = body.config.hidden_size
        with torch.device(device):
            head = task_head(cfg.task.name, hidden, num_classes(cfg))
    return TaskModel(body, head, kind, cfg.model.pooling).train()


def load_stage1(model: TaskModel, run_dir: str, step: int) -> Path:
    """Start the stack from a stage-1 run's checkpoint: its LoRA and its projection U. U stays frozen in stage 2,
    so it is not in stage-2 checkpoints: keep_stage1 writes it into the stage-2 run folder."""
    source = RunFolder(run_dir)
    identity = source.identity()
    if identity is not None:
        raise ConfigError(f"task.init_from: {run_dir} is a stage-2 run ({identity['command']} of the "
                          f"{identity['kind']}); give the stage-1 run folder (mtllm train) the stack starts from")
    checkpoints = Checkpoints(run_dir)
    projection = model.body.projection
    projection.requires_grad_(True)  # trained in stage 1: among the checkpoint's trainable weights
    try:
        checkpoints.load_trainable(model.body, step or None)
    finally:
        projection.requires_grad_(False)
    return checkpoints.path(step or None)


def merged_stage1(llm: nn.Module, lora_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The LLM with a stage-1 LoRA merged into its weights: the adapter `llm` (a peft model) holds, or the one
    `lora_state` (its tensors by name) loads into it."""
    if lora_state is not None:
        differing = set(trainable_parameters(llm)) ^ set(lora_state)
        if differing:
            raise ConfigError(f"the kept stage-1 LoRA does not fit the model built from the run's settings "
                              f"({len(differing)} names differ, e.g. {sorted(differing)[0]})")
        llm.load_state_dict(lora_state, strict=False)
    return llm.merge_and_unload()


def merge_stage1_lora(model: TaskModel, cfg: Config, device: torch.device | str = "cpu",
                      lora_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """task.stage1_lora merge: the stack's stage-1 LoRA (loaded from its checkpoint, or `lora_state`) merged into
    the frozen LLM, and a fresh task LoRA on it (seeded alike on every rank). Returns the merged LoRA's tensors
    (the stage-2 run keeps them: keep_stage1)."""
    merged = lora_state if lora_state is not None else {
        name: tensor.detach().cpu().clone() for name, tensor in trainable_parameters(model.body.llm).items()}
    with seeded(cfg.model.init_seed, device):
        model.body.llm = add_lora(merged_stage1(model.body.llm, lora_state), cfg.model)
    return merged


def keep_stage1(model: TaskModel, run_dir: Path, merged_lora: dict[str, torch.Tensor] | None = None) -> None:
    """Write what stage 2 keeps frozen of stage 1 into the stage-2 run folder, for evaluation and export to load:
    the stack's U, and a merged stage-1 LoRA."""
    run = RunFolder(run_dir)
    with atomic_path(run.projection_file) as tmp:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in
                   model.body.projection.state_dict().items()}, str(tmp))
    if merged_lora is not None:
        with atomic_path(run.stage1_lora_file) as tmp:
            save_file({name: tensor.contiguous() for name, tensor in merged_lora.items()}, str(tmp))


def merges_stage1(identity: dict | None, cfg: Config) -> bool:
    """Whether a stage-2 run merged its stack's stage-1 LoRA into the frozen LLM (task.stage1_lora merge)."""
    return identity is not None and identity["kind"] == "stack" and cfg.task.stage1_lora == "merge"


def kept_stage1_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    """The stage-1 LoRA a task.stage1_lora merge run merged into its frozen LLM."""
    path = RunFolder(run_dir).stage1_lora_file
    if not path.is_file():
        raise ConfigError(f"{run_dir}: a task.stage1_lora merge run without its merged stage-1 LoRA ({path.name}); "
                          f"it cannot be rebuilt")
    return load_file(str(path))


def load_projection(model: TaskModel, run_dir: Path) -> None:
    """The frozen U a stage-2 stack run trained with (runs from before U was kept trained with the seeded
    random U that build_task_model makes)."""
    path = RunFolder(run_dir).projection_file
    if model.kind == "stack" and path.is_file():
        model.body.projection.load_state_dict(load_file(str(path)))


def teacher_config(cfg: Config) -> Config:
    """The task-train run that teaches task-distill, checked against this run."""
    run = RunFolder(cfg.task.teacher)
    teacher_cfg = run.settings("task.teacher:", "; run task-train first")
    if teacher_cfg.task.model != "llm":
        raise ConfigError(f"task.teacher: {run} fine-tuned task.model {teacher_cfg.task.model!r}; the teacher must be "
                          f"a task-train run with task.model llm")
    differing = [key for key in ("llm", "llm_tokenizer", "bidirectional", "pooling")
                 if getattr(teacher_cfg.model, key) != getattr(cfg.model, key)]
    if stored_quantization(teacher_cfg.model) != stored_quantization(cfg.model):  # the same weights
        differing.append("quantization")
    if differing:
        raise ConfigError(f"task.teacher: its model.{differing[0]} differs from this run's; the teacher must be the "
                          f"stack's own LLM fine-tuned")
    if teacher_cfg.task.name != cfg.task.name or num_classes(teacher_cfg) != num_classes(cfg):
        raise ConfigError(f"task.teacher: it was fine-tuned for task {teacher_cfg.task.name!r} with "
                          f"{num_classes(teacher_cfg)} outputs; this run is {cfg.task.name!r} with {num_classes(cfg)}")
    return teacher_cfg


def load_teacher(cfg: Config, step: int, device: torch.device | str = "cpu") -> TaskModel:
    """The fine-tuned LLM with its task LoRA and head at `step`, frozen, on `device`."""
    teacher = build_task_model(teacher_config(cfg), "llm", device)
    Checkpoints(cfg.task.teacher).load_trainable(teacher, step)
    teacher.requires_grad_(False)
    return teacher.eval()


def load_head(head: nn.Module, run_dir: str, step: int) -> None:
    """Only the head's weights from a task-train checkpoint (no LLM built), frozen."""
    Checkpoints(run_dir).load_trainable(head, step, prefix="head.")
    head.requires_grad_(False)


def load_task_run(run_dir: Path | RunFolder, device: torch.device | str = "cpu") -> tuple[TaskModel, dict, Config]:
    """A stage-2 run's model as it trained, before a checkpoint's weights are loaded (Checkpoints.load_trainable):
    (the model with the frozen U of a stack run and the teacher's frozen head of a task-distill run, the run's
    identity, its settings). Export and evaluation both rebuild runs here."""
    run = RunFolder(run_dir)
    identity = run.identity()
    if identity is None:
        raise ConfigError(f"--run {run}: not a stage-2 run folder (no task.json); run task-train or task-distill")
    cfg = run.settings()
    model = build_task_model(cfg, identity["kind"], device)
    load_projection(model, run)
    if merges_stage1(identity, cfg):
        merge_stage1_lora(model, cfg, device, kept_stage1_lora(run))
    if identity["command"] == "task-distill":  # not in this run's checkpoints: the teacher's head is frozen
        load_head(model.head, cfg.task.teacher, identity["teacher_step"])
    return model, identity, cfg


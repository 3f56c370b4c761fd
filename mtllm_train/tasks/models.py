"""The models of stage 2: a body, its task representation, and the task head.

kinds of body:
- llm:        the LLM + a new task LoRA on the LLM's own tokenization (task-train; the task-distill teacher)
- mt_encoder: the MT encoder + LoRA on the MT tokenization (the "MT encoder alone" baseline)
- stack:      the stage-1 stack on the MT tokenization: its stage-1 LoRA continues, the projection U stays as
              stage 1 left it (the paper trains only the LoRA adapters in stage 2)

The task representation is the pooled vector (model.pooling) or, for multiple choice, each answer's own
span mean-pooled. In task-distill the stack's representation is pulled towards the teacher's (MSE), and the
teacher's head, frozen, predicts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtllm_train.checkpoint import Checkpoints
from mtllm_train.config import Config, ConfigError, load_config, stored_quantization
from mtllm_train.files import atomic_path
from mtllm_train.model.loading import build_llm, build_mt_encoder, seeded
from mtllm_train.portable.pooling import pool
from mtllm_train.model.stack import add_lora, build_stack, lora_train_mode
from mtllm_train.tasks.data import NLI_LABELS
from mtllm_train.portable.heads import ClassificationHead, MultipleChoiceHead, choice_pool

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

    def representation(self, input_ids, attention_mask, choice_masks=None) -> torch.Tensor:
        if self.kind == "stack":
            hidden = self.body.student_hidden(input_ids, attention_mask)
        else:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if choice_masks is not None:
            return choice_pool(hidden, choice_masks)
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, choice_masks=None, teacher_input_ids=None,
                teacher_attention_mask=None, teacher_choice_masks=None):
        """(representation, logits, teacher representation or None): one call, so the DDP / FSDP / DeepSpeed
        wrappers see a single forward."""
        representation = self.representation(input_ids, attention_mask, choice_masks)
        teacher_representation = None
        if self.teacher is not None and teacher_input_ids is not None:
            with torch.no_grad():
                teacher_representation = self.teacher.representation(teacher_input_ids, teacher_attention_mask,
                                                                      teacher_choice_masks)
        return representation, self.head(representation), teacher_representation

    def backend_parts(self) -> tuple[nn.Module, list[nn.Module]]:
        """(the module whose layers FSDP shards, the frozen modules every rank keeps whole)."""
        frozen = [self.teacher] if self.teacher is not None else []
        if self.kind == "stack":
            return self.body.llm, [self.body.mt_encoder, *frozen]
        return self.body, frozen


def num_classes(cfg: Config) -> int:
    if cfg.task.name == "nli":
        return len(NLI_LABELS)
    if cfg.task.name == "sentiment":
        if len(cfg.task.labels) < 2:
            raise ConfigError(f"task.labels: a sentiment task needs at least two label names, got {cfg.task.labels}")
        return len(cfg.task.labels)
    return 4  # Belebele: four answers


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
            head = MultipleChoiceHead(hidden) if cfg.task.name == "belebele" else ClassificationHead(
                hidden, num_classes(cfg))
    return TaskModel(body, head, kind, cfg.model.pooling).train()


PROJECTION_FILE = "stage1_projection.safetensors"  # in a stage-2 stack run's folder: U as stage 1 left it


def load_stage1(model: TaskModel, run_dir: str, step: int) -> Path:
    """Start the stack from a stage-1 run's checkpoint: its LoRA and its projection U. U stays frozen in stage 2,
    so it is not in stage-2 checkpoints: keep_projection writes it into the stage-2 run folder."""
    checkpoints = Checkpoints(run_dir)
    projection = model.body.projection
    projection.requires_grad_(True)  # trained in stage 1: among the checkpoint's trainable weights
    try:
        checkpoints.load_trainable(model.body, step or None)
    finally:
        projection.requires_grad_(False)
    return checkpoints.path(step or None)


def keep_projection(model: TaskModel, run_dir: Path) -> None:
    """Write the stack's frozen U into the stage-2 run folder, for evaluation and export to load."""
    with atomic_path(run_dir / PROJECTION_FILE) as tmp:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in
                   model.body.projection.state_dict().items()}, str(tmp))


def load_projection(model: TaskModel, run_dir: Path) -> None:
    """The frozen U a stage-2 stack run trained with (runs from before U was kept trained with the seeded
    random U that build_task_model makes)."""
    if model.kind == "stack" and (run_dir / PROJECTION_FILE).is_file():
        model.body.projection.load_state_dict(load_file(str(run_dir / PROJECTION_FILE)))


def teacher_config(cfg: Config) -> Config:
    """The task-train run that teaches task-distill, checked against this run."""
    run = Path(cfg.task.teacher)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"task.teacher: {str(run)!r} is not a run folder (no config.yaml); run task-train first")
    teacher_cfg = load_config(run / "config.yaml")
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

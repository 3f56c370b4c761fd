"""An exported MT-LLM as a transformers model: `AutoModel.from_pretrained(export, trust_remote_code=True)`, the
sentence-transformers Transformer module and `mtllm_train.export.load_mtllm` all build this class.

The frozen parts are rebuilt from where the export says they come from (a hub id, a path, or a folder inside
the export); the trained parts (LoRA adapter, projection, task head) are loaded from the export itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_mtllm import FORMAT_VERSION, MTLLMConfig
from .encoding import collate, encode_examples
from .guard import check, guard_mode
from .format import (ADAPTER_DIR, DTYPES, HEAD_FILE, PROJECTION_FILE, SHAPE_FIELDS, TEACHER_TOKENIZER_DIR, encoder_of,
                     four_bit_config, project_to_llm, task_head, task_shape)
from .heads import span_pool, word_presence
from .pooling import pool
from .tokens import InputError, pad_id, pad_right, set_source_language

def make_bidirectional(model: nn.Module) -> None:
    """Turn causal self-attention into full attention (the LLM2Vec setting).

    `config.is_causal = False` makes transformers build a bidirectional (padding-only) mask; kernels that
    run without a mask (flash-attention, SDPA's fast path) read each attention module's own `is_causal`
    flag instead, so that is cleared too.
    """
    attention_modules = [m for m in model.modules() if hasattr(m, "is_causal") and isinstance(m, nn.Module)]
    if not attention_modules:
        raise InputError(f"{type(model).__name__} has no attention modules with an is_causal flag; bidirectional "
                         f"attention is supported for Llama-family and GPT-2 models")
    model.config.is_causal = False
    for module in attention_modules:
        module.is_causal = False


def _source(spec: str, folder: Path) -> str:
    """A frozen part's weights: "./..." is a folder inside the export; anything else a hub id or a path."""
    return str(folder / spec[2:]) if spec.startswith("./") else spec


def _local_folder(name_or_path: str | Path) -> Path:
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as err:  # not a valid repo id, offline, not found: all mean "no such model"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{name_or_path}: not a local folder, and not found on the model hub ({cause})") from None


class MTLLMModel(PreTrainedModel):
    config_class = MTLLMConfig
    base_model_prefix = "mtllm"

    def __init__(self, config: MTLLMConfig, mt_encoder: nn.Module | None = None, llm: nn.Module | None = None,
                 projection: nn.Linear | None = None, head: nn.Module | None = None, tokenizer=None,
                 teacher_tokenizer=None):
        super().__init__(config)
        self.mt_encoder, self.llm, self.projection, self.head = mt_encoder, llm, projection, head
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: MTLLMConfig | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        guard: str | None = None, **kwargs) -> MTLLMModel:
        """Rebuild an exported MT-LLM (a local folder or a hub id), frozen, in eval mode, on `device` in `dtype`
        (default: the dtype it was trained with), and check that it computes what it recorded at export
        (guard: warn, strict or off; default: MTLLM_GUARD, else warn; see guard.py). Other keyword arguments
        of transformers' loaders are ignored."""
        mode = guard_mode(guard)
        folder = _local_folder(pretrained_model_name_or_path)
        config = config if isinstance(config, MTLLMConfig) else MTLLMConfig.from_pretrained(folder)
        if dtype is not None and config.quantization != "none":
            raise InputError(f"{pretrained_model_name_or_path}: a {config.quantization} export computes in its compute "
                             f"dtype ({config.quant_compute_dtype}); load it without dtype=")
        export_format = getattr(config, "export_format", 1)
        if not isinstance(export_format, int) or export_format > FORMAT_VERSION:
            raise InputError(f"{pretrained_model_name_or_path}: export format {export_format!r} is not one this code "
                             f"reads (1 to {FORMAT_VERSION}); update mtllm-train, or load it with its own code: "
                             f"AutoModel.from_pretrained(..., trust_remote_code=True)")
        frozen_dtype = DTYPES[config.frozen_dtype]
        mt_encoder = llm = projection = head = teacher_tokenizer = None
        if config.body in ("stack", "mt_encoder"):
            mt_encoder = encoder_of(AutoModel.from_pretrained(_source(config.mt_encoder, folder), dtype=frozen_dtype))
        if config.body in ("stack", "llm"):
            quantization = None if config.quantization == "none" else four_bit_config(
                config.quantization, config.quant_double, config.quant_compute_dtype, config.quant_storage_dtype)
            llm = AutoModel.from_pretrained(_source(config.llm, folder), dtype=frozen_dtype,
                                            quantization_config=quantization)
            if config.bidirectional:
                make_bidirectional(llm)
        if not config.merged:
            adapted = mt_encoder if config.body == "mt_encoder" else llm
            adapted = PeftModel.from_pretrained(adapted, str(folder / ADAPTER_DIR))
            mt_encoder, llm = (adapted, llm) if config.body == "mt_encoder" else (mt_encoder, adapted)
        if config.body == "stack":
            weights = load_file(str(folder / PROJECTION_FILE))
            projection = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            projection.load_state_dict(weights)
            if (folder / TEACHER_TOKENIZER_DIR).is_dir():
                teacher_tokenizer = AutoTokenizer.from_pretrained(str(folder / TEACHER_TOKENIZER_DIR))
        if config.task is not None:
            weights = load_file(str(folder / HEAD_FILE))
            head = task_head(config.task["name"], weights["linear.weight"].shape[1], weights["linear.weight"].shape[0])
            head.load_state_dict(weights)
        # config=: the tokenizer's own tokenizer_config.json names its class; the folder's config.json is ours.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=config)
        model = cls(config, mt_encoder, llm, projection, head, tokenizer, teacher_tokenizer)
        model.requires_grad_(False)
        model = model.to(device=device, dtype=DTYPES.get(dtype, dtype)).eval()
        model.export_folder = folder
        check(model, folder, f"MT-LLM {pretrained_model_name_or_path}", mode)
        return model

    @property
    def view(self) -> str:
        """The tokenization the model reads: the LLM's ("llm") or the MT encoder's ("mt")."""
        return "llm" if self.config.body == "llm" else "mt"

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's last hidden states [B, T, D]; for the stack, the LLM's over the MT encoder's tokens."""
        if self.config.body == "llm":
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        states = self.mt_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.body == "mt_encoder":
            return states
        embeds = project_to_llm(self.projection, states, self.llm.get_input_embeddings().weight.dtype)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> BaseModelOutput:
        """Token states, as transformers' feature extractors and sentence-transformers expect them."""
        return BaseModelOutput(last_hidden_state=self.hidden_states(input_ids, attention_mask))

    def representation(self, input_ids, attention_mask, span_masks=None) -> torch.Tensor:
        """The pooled vector [B, D] (fp32), or each answer's or word's span mean [B, K, D] (multiple choice, token
        classification)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        if span_masks is not None:
            return span_pool(hidden, span_masks)
        return pool(hidden, attention_mask, self.config.pooling)

    def _batches(self, tokenizer, texts: list[str], batch_size: int, view: str):
        for start in range(0, len(texts), batch_size):
            ids = tokenizer(texts[start:start + batch_size], truncation=True,
                            max_length=self.config.view_max_length[view])["input_ids"]
            yield (tensor.to(self.device) for tensor in pad_right(ids, pad_id(tokenizer)))

    @torch.no_grad()
    def encode(self, texts: str | list[str], lang: str | None = None, batch_size: int = 32, normalize: bool = False,
               convert_to_numpy: bool = False):
        """Embed text in any language the MT encoder reads: [N, D] (one text: [D]) as a tensor, or a numpy
        array. lang: the text's FLORES-200 code (e.g. "deu_Latn"; default: the language it was trained on)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise InputError("encode: no texts")
        set_source_language(self.tokenizer, lang or self.config.source_language)
        vectors = torch.cat([self.representation(ids, mask)
                             for ids, mask in self._batches(self.tokenizer, texts, batch_size, self.view)])
        if normalize:
            vectors = F.normalize(vectors, dim=-1)
        vectors = vectors[0] if single else vectors
        return vectors.cpu().numpy() if convert_to_numpy else vectors

    @torch.no_grad()
    def encode_teacher(self, texts: str | list[str], batch_size: int = 32) -> torch.Tensor:
        """The LLM alone (adapters off) on its own tokens: what stage 1 taught the stack to reproduce."""
        if self.teacher_tokenizer is None or self.config.merged:
            raise InputError("encode_teacher needs a stack export with its LoRA adapter kept (not merged)")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        vectors = []
        with self.llm.disable_adapter():
            for ids, mask in self._batches(self.teacher_tokenizer, texts, batch_size, "llm"):
                hidden = self.llm(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                vectors.append(pool(hidden, mask, self.config.pooling))
        vectors = torch.cat(vectors)
        return vectors[0] if single else vectors

    @torch.no_grad()
    def encode_mt_encoder(self, texts: str | list[str], lang: str | None = None, batch_size: int = 32) -> torch.Tensor:
        """The MT encoder alone, mean-pooled over its tokens: the baseline the stack is compared with."""
        if self.mt_encoder is None:
            raise InputError("encode_mt_encoder needs an export with an MT encoder (a stack)")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        set_source_language(self.tokenizer, lang or self.config.source_language)
        vectors = torch.cat([pool(self.mt_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")
                             for ids, mask in self._batches(self.tokenizer, texts, batch_size, "mt")])
        return vectors[0] if single else vectors

    def _examples(self, inputs) -> tuple[list[dict], bool]:
        """Task inputs as examples: texts (a sequence task; a token task splits them at white space), (premise,
        hypothesis) pairs (a pair task), or dicts with the task's fields (any task, e.g. passage / question /
        answers for multiple choice, words for token classification)."""
        task, shape = self.config.task["name"], task_shape(self.config.task["name"])
        single = isinstance(inputs, (str, dict)) or (shape == "pair" and isinstance(inputs, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise InputError("predict: no inputs")
        if shape == "sequence":
            examples = [item if isinstance(item, dict) else {"text": item} for item in items]
        elif shape == "token":
            examples = [item if isinstance(item, dict) else {"words": item.split()} for item in items]
        elif shape == "pair":
            examples = [item if isinstance(item, dict) else {"premise": item[0], "hypothesis": item[1]} for item in items]
        else:
            examples = [dict(item) for item in items]
        fields = SHAPE_FIELDS[shape]
        for number, example in enumerate(examples, 1):
            missing = [name for name in fields if name not in example]
            if missing:
                raise InputError(f"input {number}: a {task} model reads {', '.join(fields)}; it has no "
                                 f"{', '.join(missing)}")
        if shape == "token":
            for number, example in enumerate(examples, 1):
                if not isinstance(example["words"], list) or not example["words"]:
                    raise InputError(f"input {number}: a {task} model reads words: a non-empty list of words")
            return [{**example, "label": [0] * len(example["words"])} for example in examples], single
        return [{**example, "label": 0} for example in examples], single

    @torch.no_grad()
    def _scores(self, inputs, lang: str | None, batch_size: int) -> tuple[list[torch.Tensor], bool]:
        """Per input: its class (or answer) logits [C], or for token classification its words' [W, C] (a word
        without tokens scores 0 everywhere, so its prediction is the first label, as in evaluation)."""
        if self.head is None:
            raise InputError("predict needs a task model (a stage-2 export); this export is an embedder: use encode")
        examples, single = self._examples(inputs)
        set_source_language(self.tokenizer, lang or self.config.source_language)
        items = encode_examples(examples, self.config.task["name"], self.tokenizer, self.config.view_max_length[self.view],
                                self.config.task.get("word_pooling", "first"))
        scores = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch, _ = collate(chunk, pad_id(self.tokenizer))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.head(self.representation(**batch)).float()
            if isinstance(chunk[0]["label"], list):
                logits = logits.masked_fill(~word_presence(batch["span_masks"]).unsqueeze(-1), 0.0)
                scores.extend(row[:len(item["label"])] for row, item in zip(logits, chunk))
            else:
                scores.extend(logits)
        return scores, single

    def logits(self, inputs, lang: str | None = None, batch_size: int = 32):
        """Class (or answer) logits [N, C] of a task model, float32; one input gives [C]. Token classification:
        a list of [W, C] (one per input: its words); one input gives [W, C]."""
        scores, single = self._scores(inputs, lang, batch_size)
        if single:
            return scores[0]
        return scores if task_shape(self.config.task["name"]) == "token" else torch.stack(scores)

    def predict_proba(self, inputs, lang: str | None = None, batch_size: int = 32):
        """Class (or answer) probabilities, shaped as `logits`."""
        logits = self.logits(inputs, lang, batch_size)
        return [row.softmax(-1) for row in logits] if isinstance(logits, list) else logits.softmax(-1)

    def predict(self, inputs, lang: str | None = None, batch_size: int = 32):
        """Predicted label names (for multiple choice: the index of the answer), one per input; for token
        classification a list of label names per input, one per word."""
        labels = self.config.task.get("labels")
        scores, single = self._scores(inputs, lang, batch_size)

        def named(chosen: torch.Tensor):
            names = [labels[k] if labels else k for k in chosen.reshape(-1).tolist()]
            return names[0] if chosen.dim() == 0 else names

        predictions = [named(row.argmax(-1)) for row in scores]
        return predictions[0] if single else predictions

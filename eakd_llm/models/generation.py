"""Sampling responses with HF ``generate``: one place for evaluation and on-policy training.

:func:`generate_token_ids` turns token-id prompts into new token ids (left-padded batches, per-row budgets, cut after
the first end token); evaluation decodes them (:func:`eakd_llm.evaluation.protocol.generate_predictions`), on-policy
training re-collates them as responses (:mod:`eakd_llm.training.on_policy`). Sharded models are gathered once per call
by the caller (:func:`eakd_llm.models.sharding.gathered_for_generation`), not per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from ..config.eakd_config import ConfigError
from ..data.dataset import left_pad, tokenize_example
from ..data.prompts import chat_end_token_id
from ..loss.distillation import IGNORE_INDEX

__all__ = [
    "BUDGETS",
    "GenerationSettings",
    "encode_prompt",
    "end_token_ids",
    "generate_token_ids",
    "left_pad",
    "model_device",
]

BUDGETS: tuple[str, ...] = ("fixed", "remaining")


@dataclass
class GenerationSettings:
    """How responses are generated; the defaults are MiniLLM's evaluation settings.

    ``max_prompt_length``: prompts longer than this many tokens keep their end (where the instruction meets
    ``### Response:``) and their BOS, exactly as training truncates them
    (:func:`eakd_llm.data.dataset.tokenize_example`).
    ``max_length`` and ``budget`` set how many new tokens a record may generate:

    * ``fixed`` (default, MiniLLM's ``evaluate_main.py``): ``max_length - max_prompt_length`` for every record
      (MiniLLM left-pads every prompt to ``max_prompt_length`` and generates ``max_length - 256`` = 256 new tokens);
    * ``remaining``: ``max_length - len(prompt)``, so a short prompt may generate more.

    ``max_new_tokens``, when set, caps either. ``do_sample=False`` is greedy decoding; ``top_k=0`` disables top-k
    filtering, ``top_p=1.0`` nucleus filtering. ``batch_size`` prompts are generated together (left-padded).
    """

    max_prompt_length: int = 256
    max_length: int = 512
    max_new_tokens: int | None = None
    budget: str = "fixed"
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    batch_size: int = 16

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values generation cannot work with."""
        if self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}")
        if self.max_length <= self.max_prompt_length:
            raise ConfigError(
                f"max_length ({self.max_length}) must exceed max_prompt_length ({self.max_prompt_length}): it counts "
                "the prompt and the generated tokens together"
            )
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget={self.budget!r} is not allowed; choose one of: {', '.join(BUDGETS)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1 (or unset), got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables top-k filtering), got {self.top_k}")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}")

    def new_token_budget(self, prompt_length: int) -> int:
        """How many tokens a prompt of ``prompt_length`` tokens may generate (at least 1)."""
        budget = self.max_length - (self.max_prompt_length if self.budget == "fixed" else prompt_length)
        if self.max_new_tokens is not None:
            budget = min(budget, self.max_new_tokens)
        return max(budget, 1)


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int, add_special_tokens: bool = True) -> list[int]:
    """Prompt token ids, truncated exactly as training truncates prompts.

    ``add_special_tokens``: the tokenizer's special tokens (BOS) are added, as for a template-rendered instruction
    prompt; a chat-rendered prompt already holds the template's own and takes False, so each is there exactly once.
    :func:`eakd_llm.data.dataset.tokenize_example` is the single source of the rule (a long prompt keeps its end and its
    BOS); the response is empty here, so its ``max_length`` only has to exceed ``max_prompt_length``.
    """
    example = tokenize_example(prompt, "", tokenizer, max_prompt_length + 1, max_prompt_length,
                               prompt_has_special_tokens=not add_special_tokens)
    prompt_length = sum(1 for label in example["labels"] if label == IGNORE_INDEX)
    return example["input_ids"][:prompt_length]


def end_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, each id of the model's ``generation_config.eos_token_id``
    (chat models list several: Qwen2.5-Instruct ``<|im_end|>`` and ``<|endoftext|>``, Llama-3-Instruct three) and the
    chat template's end-of-turn token (:func:`eakd_llm.data.prompts.chat_end_token_id`), the last target of every chat
    record in training, so a model trained on chat records stops where its targets stopped."""
    ids: list[int] = []
    generation_config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, generation_config, chat_end_token_id(tokenizer)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _generation_config(
    settings: GenerationSettings, eos_ids: list[int], pad_id: int, max_new_tokens: int
) -> transformers.GenerationConfig:
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": settings.do_sample,
        "num_beams": 1,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
        "eos_token_id": (eos_ids[0] if len(eos_ids) == 1 else eos_ids) or None,
        "pad_token_id": pad_id,
    }
    if settings.do_sample:
        # top_k=0 is passed as is: transformers adds no TopKLogitsWarper when top_k == 0 (nor a top-p warper for
        # top_p=1.0, nor a temperature warper for 1.0), i.e. pure ancestral sampling, as MiniLLM's `--top-k 0`.
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return transformers.GenerationConfig(**kwargs)


class _RowBudget(transformers.StoppingCriteria):
    """Row ``i`` is finished once it has ``budgets[i]`` new tokens; rows of one batch may have different budgets."""

    def __init__(self, prompt_width: int, budgets: Sequence[int]):
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        return self.budgets.to(input_ids.device) <= generated


class _RowSampler(transformers.LogitsProcessor):
    """Draws each row's next token with that row's own generator and leaves only that token possible: ``generate``'s
    own draw then has one choice. A row's answer so depends on its seed, not on the other rows of its batch or on how
    many batches came before it. ``generate`` runs a caller's processors *before* its temperature, top-k and top-p
    warpers (transformers 5), so this processor applies ``settings``' temperature, top-k and top-p itself (the
    warpers that follow leave a single possible token as it is)."""

    def __init__(self, generators: Sequence[torch.Generator], settings: GenerationSettings):
        self.generators = list(generators)
        self.temperature, self.top_k, self.top_p = settings.temperature, settings.top_k, settings.top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = self.probs(scores).cpu()
        chosen = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen.to(scores.device), 0.0)

    def probs(self, scores: torch.FloatTensor) -> torch.Tensor:
        """The distribution each row is drawn from: softmax of the scores at the temperature, top-k and top-p."""
        logits = scores.float() / self.temperature
        if self.top_k > 0:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:  # the smallest set of tokens whose mass reaches top_p, as transformers' TopPLogitsWarper
            ordered, order = logits.sort(dim=-1, descending=False)
            outside = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            outside[..., -1] = False  # the most likely token always stays
            logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
        return logits.softmax(-1)


def generate_token_ids(
    model,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    pad_id: int,
    keep_eos: bool = False,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids for each token-id prompt: left-padded batches of ``settings.batch_size`` through ``generate``.

    Each row may generate ``settings.new_token_budget(len(prompt))`` tokens and is cut at its first id in ``eos_ids``
    (kept when ``keep_eos``: on-policy training learns to stop too). The caller seeds the RNG, or, when sampling,
    gives one seed per prompt (``row_seeds``): each prompt is then sampled with its own generator, whatever batch it
    shares (up to the rounding of differently padded batches). The model's own
    ``generation_config`` (a hub checkpoint's default temperature or repetition penalty) is set aside during the call
    so every model is decoded by ``settings`` alone; the model runs in eval mode, no gradients, and its training flag
    and generation config are restored afterwards.
    """
    settings.validate()
    if not prompts:
        return []
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    device = model_device(model)
    eos = set(int(i) for i in eos_ids)
    was_training = model.training
    # A PEFT model's generate copies its config onto the base model: set aside and restore both.
    holders = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    saved = [(holder, holder.generation_config) for holder in holders
             if getattr(holder, "generation_config", None) is not None]
    model.eval()
    for holder, _ in saved:
        holder.generation_config = transformers.GenerationConfig()
    out: list[list[int]] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), settings.batch_size):
                batch = prompts[start:start + settings.batch_size]
                input_ids, attention_mask = left_pad(batch, pad_id)
                width = input_ids.shape[1]
                budgets = [settings.new_token_budget(len(ids)) for ids in batch]
                processors = transformers.LogitsProcessorList()
                if row_seeds is not None and settings.do_sample:
                    seeds = row_seeds[start:start + settings.batch_size]
                    processors.append(_RowSampler([torch.Generator().manual_seed(int(s)) for s in seeds], settings))
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=_generation_config(settings, list(eos_ids), pad_id, max(budgets)),
                    stopping_criteria=transformers.StoppingCriteriaList([_RowBudget(width, budgets)]),
                    logits_processor=processors,
                )
                sequences = (output.sequences if hasattr(output, "sequences") else output).cpu()
                for row, budget in enumerate(budgets):
                    new_tokens = sequences[row, width:width + budget].tolist()
                    for index, token in enumerate(new_tokens):
                        if token in eos:
                            new_tokens = new_tokens[:index + 1] if keep_eos else new_tokens[:index]
                            break
                    out.append(new_tokens)
    finally:
        for holder, config in saved:
            holder.generation_config = config
        model.train(was_training)
    return out

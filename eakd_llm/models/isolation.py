"""The check that a model keeps packed documents apart (``packing: true``), run once before training.

Whether packed documents stay apart depends on the model's code and attention kernel, so the model is run on two
packed documents and training is refused when the second one's hidden states differ from the same document run alone
(:mod:`eakd_llm.data.packing` builds the packed batches).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.eakd_config import FLASH_REFUSAL, ConfigError, uses_flash_attention
from .loading import final_hidden_states
from .sharding import unwrap_causal_lm


@torch.no_grad()
def check_isolation(model: nn.Module, name: str, vocab_size: int, device: torch.device) -> float:
    """Raise :class:`ConfigError` unless ``model`` keeps packed documents apart; returns the relative difference.

    Two rows, each packing two documents (position ids restarting at 0, no attention mask), as a packed micro-batch
    has several rows: each row's second document must give the same final hidden states as when it is run alone.
    Flash-attention kernels are refused outright (:data:`FLASH_REFUSAL`). Every process calls this with the same
    input (sharded models gather parameters collectively).
    """
    causal_lm = unwrap_causal_lm(model)
    config = getattr(causal_lm, "config", None)
    kernel = getattr(config, "_attn_implementation", None) or "default"
    if uses_flash_attention(kernel):
        raise ConfigError(f"{FLASH_REFUSAL} (the {name} runs attn_implementation={kernel})")
    docs = ([3, 4, 5, 6, 7], [8, 9, 10, 11]), ([12, 13, 14, 15], [16, 17, 18, 19, 20])
    rows = [[i % vocab_size for i in a + b] for a, b in docs]
    positions = [list(range(len(a))) + list(range(len(b))) for a, b in docs]
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        together = final_hidden_states(causal_lm, input_ids=torch.tensor(rows, device=device),
                                       position_ids=torch.tensor(positions, device=device)).float()
        difference = 0.0
        for row, (first, second) in enumerate(docs):
            alone = torch.tensor([rows[row][len(first):]], device=device)
            reference = final_hidden_states(causal_lm, input_ids=alone,
                                            position_ids=torch.arange(len(second), device=device)[None])[0].float()
            gap = (together[row, len(first):] - reference).abs().max() / reference.abs().max().clamp(min=1e-6)
            difference = max(difference, float(gap))
    finally:
        causal_lm.train(was_training)
    dtype = next(causal_lm.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    if not difference <= tolerance:
        raise ConfigError(
            f"packing: the {name} ({type(causal_lm).__name__}, attn_implementation={kernel}) lets packed documents "
            f"attend to each other: a packed document's hidden states differ from the same document alone by "
            f"{difference:.2g} (relative). Set packing: false, or use a model and attention kernel that separate "
            "documents by position_ids in every row (e.g. Llama/Qwen with sdpa or eager)"
        )
    return difference

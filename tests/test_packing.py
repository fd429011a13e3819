"""Packing: rows of several documents with per-document position ids give the padded batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.data.dataset import DistillationCollator
from eakd_llm.data.packing import pack_batch, padding_fraction, plan_rows
from eakd_llm.models.isolation import check_isolation
from eakd_llm.training.train import prepare_run
from eakd_llm.training.trainer import EAKDTrainer


def _config(tiny_stack, tmp_path, **overrides) -> EAKDConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_stack["student"],
        teacher_model_name_or_path=tiny_stack["teacher"], dataset_name=tiny_stack["data_dir"],
        response_column="output", max_length=96, max_prompt_length=64, use_cpu=True, per_device_train_batch_size=8,
        max_steps=2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return EAKDConfig(**values)


def test_plan_rows_first_fit_decreasing():
    assert plan_rows([5, 3, 4, 2, 6], capacity=8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4 (original order inside)
    assert plan_rows([9, 1], capacity=8) == [[0], [1]]  # too long for a row: a row of its own
    rows = plan_rows([3] * 7, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(7)) and all(len(r) <= 3 for r in rows)


def test_pack_batch_layout():
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8]},
        {"input_ids": [9, 10, 11, 12], "labels": [9, -100, 11, 12]},  # a label on the first token must be dropped
    ]
    batch = pack_batch(features, pad_token_id=0, capacity=8)
    assert batch["example_order"].tolist() == [0, 1, 2]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, -1, -1, -1, -1]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5, -100, 7, 8], [-100, -100, 11, 12, -100, -100, -100,
                                                                              -100]]
    assert "attention_mask" not in batch
    assert padding_fraction(batch) == pytest.approx(4 / 16)
    padded = DistillationCollator(0)(features)
    assert padding_fraction(padded) == pytest.approx(3 / 15)


@pytest.mark.parametrize(("fused", "granularity", "normalize"), [
    (True, "token", "none"), (True, "sequence", "none"), (False, "sequence", "mean"), (False, "token", "none"),
])
def test_packed_batch_has_the_padded_batch_loss_and_gradients(tiny_stack, tmp_path, fused, granularity, normalize):
    """Same examples, packed (several documents a row, sequence-level EA per document) or padded: same loss and
    student gradients, through the trainer's own compute_loss."""
    config = _config(tiny_stack, tmp_path, fused_loss=fused, ea_granularity=granularity, ea_normalize=normalize,
                     loss_chunk_size=16)
    parts = prepare_run(config)
    trainer = EAKDTrainer(args=config, **parts)
    features = [trainer.train_dataset[i] for i in range(12)]
    padded = DistillationCollator(parts["processing_class"].pad_token_id)(features)
    packed = DistillationCollator(parts["processing_class"].pad_token_id, packing_capacity=config.max_length)(features)
    assert packed["input_ids"].shape[0] < len(features)  # several documents share a row
    assert padding_fraction(packed) < padding_fraction(padded)

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    losses, grads = [], []
    for batch in (padded, packed):
        loss = trainer.compute_loss(trainer.model, batch)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for packed_grad, padded_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)


def test_isolation_check_passes_and_refuses_a_model_that_mixes_documents(tiny_stack, tmp_path, monkeypatch):
    import transformers.masking_utils as masking_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    assert check_isolation(model, "student", 100, torch.device("cpu")) < 1e-5
    # A model / kernel that ignores the position ids: documents see each other, and packing is refused.
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match="packing: the student .* lets packed documents attend to each other"):
        check_isolation(model, "student", 100, torch.device("cpu"))


def test_isolation_check_covers_every_row(tiny_stack, monkeypatch):
    """A kernel that keeps documents apart in the first row only (as flash attention's packed-sequence detection does
    for one-row batches) is refused: the check packs two rows."""
    import transformers.masking_utils as masking_utils
    from transformers import AutoModelForCausalLM

    original = masking_utils.find_packed_sequence_indices

    def first_row_only(position_ids):
        indices = original(position_ids)
        if indices is not None and indices.shape[0] > 1:
            indices = indices.clone()
            indices[1:] = 0  # later rows: one sequence, plain causal attention across the boundary
        return indices

    model = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", first_row_only)
    with pytest.raises(ConfigError, match="lets packed documents attend to each other"):
        check_isolation(model, "student", 100, torch.device("cpu"))


def test_packing_with_flash_attention_is_refused(tiny_stack, tmp_path):
    """transformers decides "packed" for flash attention only for one-row batches; a packed micro-batch has several
    rows, so packing with a flash kernel is refused up front (config) and by the isolation check (a model whose
    kernel was set elsewhere). The helper's behaviour is checked on CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert _is_packed_sequence(positions[:1], batch_size=1)
    assert not _is_packed_sequence(positions, batch_size=2)  # two packed rows: not seen as packed
    with pytest.raises(ConfigError, match="packing with flash attention is not supported.*ONE row"):
        _config(tiny_stack, tmp_path, packing=True, attn_implementation="flash_attention_2")
    _config(tiny_stack, tmp_path, packing=False, attn_implementation="flash_attention_2")  # no packing: fine
    model = AutoModelForCausalLM.from_pretrained(tiny_stack["student"])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="flash attention is not supported.*attn_implementation=flash_attention_2"):
        check_isolation(model, "student", 100, torch.device("cpu"))


def test_trainer_refuses_packing_before_the_first_step_when_documents_mix(tiny_stack, tmp_path, monkeypatch):
    import transformers.masking_utils as masking_utils

    config = _config(tiny_stack, tmp_path, packing=True)
    trainer = EAKDTrainer(args=config, **prepare_run(config))
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with pytest.raises(ConfigError, match="packing"):
        trainer.compute_loss(trainer.model, batch)

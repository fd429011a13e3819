"""EA's weight spread: the statistics against hand computations, the per-token terms against a direct forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eakd_llm.data.prompts import EvalRecord
from eakd_llm.evaluation.fidelity import chat_examples
from eakd_llm.loss.distillation import IGNORE_INDEX
from eakd_llm.models.loading import load_tokenizer
from eakd_llm.studies.weight_spread import spread_stats, spread_table, token_terms


def test_spread_stats_by_hand():
    w = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    d = np.array([0.5, 0.1, 0.2, 0.3, 2.0])
    stats = spread_stats(w, d)
    assert stats["mean"] == 4.0
    assert stats["cv"] == pytest.approx(np.sqrt(((w - 4) ** 2).mean()) / 4)
    assert stats["p10"] == pytest.approx(1.4) and stats["p90"] == pytest.approx(7.6)
    assert stats["p90_p10"] == pytest.approx(7.6 / 1.4)
    assert stats["s_eff_over_mean"] == pytest.approx((w * d).sum() / d.sum() / 4.0)
    assert stats["top20_kl_share"] == pytest.approx(2.0 / 3.1)  # the top 20% of 5 tokens: the one with w = 10
    assert stats["corr_kl"] == pytest.approx(np.corrcoef(w, d)[0, 1])
    flat = spread_stats(np.full(10, 3.0), np.arange(10.0) + 1)
    assert flat["cv"] == 0 and flat["s_eff_over_mean"] == pytest.approx(1.0) and math.isnan(flat["corr_kl"])
    with pytest.raises(ValueError, match="two or more tokens"):
        spread_stats(np.ones(3), np.ones(2))


def test_token_terms_and_weights_equal_a_direct_computation(tiny_stack):
    tokenizer = load_tokenizer(tiny_stack["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_stack["student"]).eval()
    records = [EvalRecord("q", ["apple banana"], [{"role": "user", "content": "Name two fruits."}]),
               EvalRecord("q", ["a much longer answer about many fruits"], [{"role": "user", "content": "More?"}])]
    examples = chat_examples(records, tokenizer, 128, 96)
    terms = token_terms(teacher, student, examples, tokenizer.pad_token_id, temperatures=(1.0, 2.0), batch_size=2)
    h_t, h_s, kl = [], [], []
    for example in examples:  # one unpadded example at a time, float64
        ids = torch.tensor([example["input_ids"]])
        keep = torch.tensor(example["labels"][1:]) != IGNORE_INDEX
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[0, :-1][keep].double()
            s = student(input_ids=ids).logits[0, :-1][keep].double()
        log_t, log_s = t.log_softmax(-1), s.log_softmax(-1)
        kl.append((log_t.exp() * (log_t - log_s)).sum(-1))
        h_t.append(-((t / 2).softmax(-1) * (t / 2).log_softmax(-1)).sum(-1))
        h_s.append(-((s / 2).softmax(-1) * (s / 2).log_softmax(-1)).sum(-1))
    np.testing.assert_allclose(terms["kl"], torch.cat(kl).numpy(), atol=1e-5)
    np.testing.assert_allclose(terms["h_t"][2.0], torch.cat(h_t).numpy(), atol=1e-4)
    np.testing.assert_allclose(terms["h_s"][2.0], torch.cat(h_s).numpy(), atol=1e-4)
    vocab = terms["vocab"]
    w = 0.5 * (torch.cat(h_t) + torch.cat(h_t) * torch.cat(h_s) / math.log(vocab))
    rows = {(r["entropy_temperature"], r["ea_formula"]): r for r in spread_table(terms)}
    assert rows[(2.0, "full")]["mean"] == pytest.approx(float(w.mean()), rel=1e-4)
    assert rows[(2.0, "teacher")]["mean"] == pytest.approx(float(torch.cat(h_t).mean()), rel=1e-4)
    assert rows[(2.0, "full")]["tokens"] == sum(int(k) for e in examples for k in
                                                (torch.tensor(e["labels"][1:]) != IGNORE_INDEX))

"""``eakd-llm demo --quick`` end to end: the files and table rows the README's main job promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eakd_llm.demo import METHODS, QUICK, CachedTeacher

REPO = Path(__file__).resolve().parents[1]


def test_cached_teacher_returns_the_same_logits_and_counts_hits(tiny_stack):
    from transformers import AutoModelForCausalLM

    from eakd_llm.models import final_hidden_states

    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    cached = CachedTeacher(teacher)
    ids = torch.tensor([[0, 5, 9, 12], [0, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    first = cached(input_ids=ids, attention_mask=mask).logits
    second = cached(input_ids=ids, attention_mask=mask).logits
    assert (cached.hits, cached.misses) == (1, 1)
    torch.testing.assert_close(first, second)
    with torch.no_grad():
        direct = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(first, direct.logits, atol=1e-5, rtol=1e-5)
    # the fused loss asks for hidden states only, through the same helper as for any model
    torch.testing.assert_close(final_hidden_states(cached, input_ids=ids, attention_mask=mask),
                               direct.hidden_states[-1])
    assert cached.hits == 2
    cached(input_ids=ids, attention_mask=torch.ones_like(mask))  # another mask is another batch
    assert cached.misses == 2


@pytest.mark.slow
def test_demo_quick_writes_results_table_and_plots(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "eakd_llm.cli", "demo", "--quick", "--output-dir", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "== [1/" in result.stdout and "teacher SFT" in result.stdout

    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["methods"]]
    assert names == ["Teacher (SFT)", *METHODS]
    for row in results["methods"]:
        for metric in ("rougeL", "exact_match"):
            assert 0.0 <= row[metric]["mean"] <= 100.0
            assert len(row[metric]["per_seed"]) == len(QUICK.seeds)
    assert len(results["ablation"]) == len(QUICK.ablation)
    assert results["teacher_cache"]["hits"] > 0  # every distilled run after the first reused the teacher's logits

    table = (out / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert "| granularity | τ′ | kd_ratio |" in table
    for plot in ("rougeL.png", "loss_curves.png", "entropy_distributions.png"):
        assert (out / plot).stat().st_size > 5000
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses the trained teacher instead of training it again.
    again = subprocess.run([sys.executable, "-m", "eakd_llm.cli", "demo", "--quick", "--no-ablation",
                            "--output-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "reusing the trained teacher" in again.stdout

"""The trainer's sharded teachers (DeepSpeed ZeRO-3 engine, FSDP2), run for real under torchrun with 2 ranks (CPU)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import run_with_a_free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _torchrun(script: str, tiny_stack, tmp_path: Path, args: list[str] | None = None) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0"}

    def commands(port: int) -> list[list[str]]:
        return [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 str(REPO / "tests" / "distributed_scripts" / script),
                 *(args if args is not None else [tiny_stack["teacher"]]), str(tmp_path)]]

    (result,) = run_with_a_free_port(commands, env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp2_teacher_is_sharded_and_keeps_logits(tiny_stack, tmp_path):
    ranks = _torchrun("fsdp2_teacher.py", tiny_stack, tmp_path)
    full = ranks[0]["full_elements"]
    assert sum(r["local_elements"] for r in ranks) == full
    for r in ranks:
        assert abs(r["local_elements"] - full / 2) <= 0.01 * full
        assert r["max_abs_diff"] == 0.0 and r["hidden_max_abs_diff"] == 0.0
        assert r["head_equal"]


def test_zero3_teacher_engine_shards_parameters_and_keeps_logits(tiny_stack, tmp_path):
    pytest.importorskip("deepspeed", reason="install the deepspeed extra: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'")
    ranks = _torchrun("zero3_teacher.py", tiny_stack, tmp_path)
    full = ranks[0]["full_elements"]
    assert sum(r["local_elements"] for r in ranks) == full
    for r in ranks:
        assert r["stage"] == 3
        assert abs(r["local_elements"] - full / 2) <= 0.01 * full  # each rank holds about half of the teacher
        assert r["max_abs_diff"] == 0.0  # same logits as the unsharded teacher
        assert r["head_numel_outside_gather"] == 0 and r["head_gathered_equal"]


@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_fused_loss_gathers_sharded_heads(mode, tiny_stack, tmp_path):
    """The fused loss on sharded models (frozen student head, teacher) equals the unsharded one; heads stay sharded."""
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="install the deepspeed extra")
    ranks = _torchrun("fused_sharded_heads.py", tiny_stack, tmp_path,
                      [mode, tiny_stack["student"], tiny_stack["teacher"]])
    for r in ranks:
        assert r["heads_sharded"] == [True, True]
        # Outside the loss call each rank holds at most half of each head (ZeRO-3: nothing outside a gather).
        for local, full in zip(r["head_numel_after"], r["head_numel_full"]):
            assert local <= full // 2 + 1
        assert r["loss"] == pytest.approx(r["expected_loss"], rel=1e-6)
        assert r["grad_max_abs_diff"] <= 1e-6 * max(1.0, r["grad_max_abs"])
        assert r["grad_max_abs"] > 0 and 0 < r["ea_weight_mean"] <= math.log(512)  # w <= H_ub = log V


@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_generation_from_a_sharded_student(mode, tiny_stack, tmp_path):
    """On-policy generation under FSDP2 and ZeRO-3: the unsharded model's greedy tokens, no parameter gather while
    tokens are generated (gathered once before), the parameters sharded again afterwards."""
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="install the deepspeed extra")
    ranks = _torchrun("sharded_generation.py", tiny_stack, tmp_path, [mode, tiny_stack["student"]])
    for r in ranks:
        assert r["equal"], r
        assert max(r["new_tokens"]) > 1
        assert r["gathers_during_generate"] == 0
        assert r["full"] == r["model_full"] and r["local"] <= r["full"] // 2 + 1000
        assert r["forward_after_max_abs_diff"] < 1e-5
        assert r["reshard_settings_kept"]  # each FSDP2 module's own reshard-after-forward setting is back

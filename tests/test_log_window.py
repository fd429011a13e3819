"""The log window: means, extremes, EA's effective scale as a ratio of sums, the clipped-step share, per source."""

import pytest
import torch

from eakd_llm.config.eakd_config import EAKDConfig
from eakd_llm.loss.distillation import LossSettings
from eakd_llm.training.log_window import LogWindow


def test_effective_scale_is_a_ratio_of_window_sums_not_a_mean_of_ratios():
    window = LogWindow()
    window.record({"kd_loss": torch.tensor(1.0), "ea_weight_min": torch.tensor(0.5), "ea_weight_max": torch.tensor(3.0),
                   "divergence_sum": torch.tensor(1.0), "weighted_divergence_sum": torch.tensor(4.0)})
    window.record({"kd_loss": torch.tensor(3.0), "ea_weight_min": torch.tensor(0.2), "ea_weight_max": torch.tensor(2.0),
                   "divergence_sum": torch.tensor(9.0), "weighted_divergence_sum": torch.tensor(9.0),
                   "num_tokens": torch.tensor(7)})
    out = window.reduce(None, torch.device("cpu"))
    assert out["kd_loss"] == pytest.approx(2.0)
    assert out["ea_weight_min"] == pytest.approx(0.2) and out["ea_weight_max"] == pytest.approx(3.0)
    assert out["ea_effective_scale"] == pytest.approx(13.0 / 10.0)  # (4 + 9) / (1 + 9), not (4 + 1) / 2
    assert "divergence_sum" not in out and "num_tokens" not in out
    assert window.reduce(None, torch.device("cpu")) == {}  # cleared


def test_sums_are_added_across_processes_and_clipping_is_a_share():
    window = LogWindow()
    window.record({"divergence_sum": torch.tensor(2.0), "weighted_divergence_sum": torch.tensor(2.0)})
    for norm in (0.5, 3.0, 7.0, 0.9):
        window.record_grad_norm(norm, max_norm=1.0)

    def gather(table):  # another process with 6 weighted over 2 divergence and no gradient norms
        other = torch.full_like(table, float("nan"))
        keys = window.keys()
        other[0, keys.index("divergence_sum")] = 2.0
        other[0, keys.index("weighted_divergence_sum")] = 6.0
        return torch.cat([table, other])

    out = window.reduce(gather, torch.device("cpu"))
    assert out["ea_effective_scale"] == pytest.approx(8.0 / 4.0)
    assert out["grad_clipped"] == pytest.approx(0.5)
    assert out["grad_norm_preclip_mean"] == pytest.approx(11.4 / 4)
    assert out["grad_norm_preclip_max"] == pytest.approx(7.0)


def test_by_source_keeps_a_ratio_per_source():
    window = LogWindow(by_source=True)
    window.record({"divergence_sum": torch.tensor(1.0), "weighted_divergence_sum": torch.tensor(2.0)}, "dataset")
    window.record({"divergence_sum": torch.tensor(1.0), "weighted_divergence_sum": torch.tensor(6.0)}, "student")
    out = window.reduce(None, torch.device("cpu"))
    assert out["ea_effective_scale"] == pytest.approx(4.0)
    assert out["ea_effective_scale/dataset"] == pytest.approx(2.0)
    assert out["ea_effective_scale/generated"] == pytest.approx(6.0)


def test_token_weighted_window_averages_over_tokens_across_processes():
    window = LogWindow(token_weighted=True)
    window.record({"ce_loss": torch.tensor(2.0), "ea_weight_min": torch.tensor(0.5)}, num_tokens=torch.tensor(30))
    window.record({"ce_loss": torch.tensor(5.0), "ea_weight_min": torch.tensor(0.1)}, num_tokens=torch.tensor(10))

    def gather(table):  # another process: one batch of 60 tokens at CE 1, and no weight statistics
        other = torch.full_like(table, float("nan"))
        keys = window.keys()
        other[0, keys.index("ce_loss")] = 60.0
        other[0, keys.index("ce_loss:tokens")] = 60.0
        return torch.cat([table, other])

    out = window.reduce(gather, torch.device("cpu"))
    assert out["ce_loss"] == pytest.approx((2 * 30 + 5 * 10 + 1 * 60) / 100)  # not the batches' mean, 8/3
    assert out["ea_weight_min"] == pytest.approx(0.1)
    assert set(out) == {"ce_loss", "ea_weight_min"}
    unweighted = LogWindow()
    unweighted.record({"ce_loss": torch.tensor(2.0)}, num_tokens=30)
    unweighted.record({"ce_loss": torch.tensor(5.0)}, num_tokens=10)
    assert unweighted.reduce(None, torch.device("cpu"))["ce_loss"] == pytest.approx(3.5)


def test_loss_settings_from_config_and_for_generated_batches(tmp_path):
    config = EAKDConfig(output_dir=str(tmp_path), model_name_or_path="m", teacher_model_name_or_path="t",
                        dataset_name="d", kd_ratio=0.3, kd_scale=2.0, divergence="jsd", ea_normalize="mean")
    settings = LossSettings.from_config(config)
    assert (settings.kd_ratio, settings.kd_scale, settings.divergence, settings.ea_normalize) == (0.3, 2.0, "jsd",
                                                                                                   "mean")
    generated = settings.for_generated_batch()
    assert (generated.kd_ratio, generated.kd_scale) == (1.0, pytest.approx(0.6))
    assert LossSettings(kd_ratio=0.0).for_generated_batch().kd_ratio == 0.0  # SFT: nothing to move


@pytest.mark.parametrize(("field", "value", "match"), [
    ("kd_ratio", 1.5, "kd_ratio must be in"), ("kd_scale", 0.0, "kd_scale"), ("divergence", "kl", "divergence="),
    ("ea_formula", "both", "ea_formula="), ("entropy_temperature", float("inf"), "entropy_temperature"),
    ("skew_alpha", 1.0, "skew_alpha"),
])
def test_loss_settings_refuse_bad_values_on_creation(field, value, match):
    extra = {"divergence": "skl"} if field == "skew_alpha" else {}
    with pytest.raises(ValueError, match=match):
        LossSettings(**{field: value, **extra})

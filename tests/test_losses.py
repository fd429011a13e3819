"""Tests for :mod:`eakd_llm.loss.distillation` against independent float64 references written from the formulas.

The numpy references below are deliberately written from scratch (probability space, float64) and never call the
module's private helpers, so they check the maths rather than re-running the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loss_helpers import distillation_loss_kw as distillation_loss

from eakd_llm.loss.distillation import ea_weights, token_divergence, token_entropy

DIVS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
GRANS = ("token", "sequence")
V = 37  # deliberately not a power of two
B, T = 3, 6
SCALE = 6.0  # logits scale: peaked distributions
TEMPS = (0.5, 1.0, 2.0)


# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 numpy references
# ----------------------------------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray, tau: float) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / tau
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(x: np.ndarray, tau: float) -> np.ndarray:
    return np.exp(np_log_softmax(x, tau))


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum p log(p/q), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def np_entropy(x: np.ndarray, tau: float = 1.0) -> np.ndarray:
    p = np_softmax(x, tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(-1)


def np_divergence(s, t, name, tau=1.0, alpha=0.1, beta=0.5) -> np.ndarray:
    ps, pt = np_softmax(s, tau), np_softmax(t, tau)
    if name == "fkl":
        return np_kl(pt, ps)
    if name == "rkl":
        return np_kl(ps, pt)
    if name == "skl":
        return np_kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "srkl":
        return np_kl(ps, (1 - alpha) * pt + alpha * ps)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)
    if name == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    raise AssertionError(name)


def np_ea_combine(h_t: np.ndarray, h_s: np.ndarray, vocab: int, formula: str = "full") -> np.ndarray:
    if formula == "teacher":
        return h_t
    if formula == "interaction":
        return h_t * h_s / math.log(vocab)
    return (h_t + h_t * h_s / math.log(vocab)) / 2


def np_ea_weights(s, t, labels=None, tau_e=1.0, granularity="token", formula="full", normalize="none") -> np.ndarray:
    h_t, h_s = np_entropy(t, tau_e), np_entropy(s, tau_e)
    vocab = s.shape[-1]
    mask = np.ones(h_t.shape, dtype=bool) if labels is None else (labels != -100)
    if granularity == "token":
        out = np_ea_combine(h_t, h_s, vocab, formula)
        per_token = out[mask]
    else:
        out = np.zeros(h_t.shape[0])
        per_token = []
        for b in range(h_t.shape[0]):
            if mask[b].any():
                out[b] = np_ea_combine(h_t[b][mask[b]].mean(), h_s[b][mask[b]].mean(), vocab, formula)
            per_token += [out[b]] * int(mask[b].sum())  # a sequence counts once per loss token
    if normalize == "mean" and len(per_token) and np.mean(per_token) > 0:
        out = out / np.mean(per_token)
    return out


def np_loss(
    s,
    t,
    labels,
    divergence="fkl",
    tau=1.0,
    ea=True,
    granularity="token",
    tau_e=2.0,
    n=None,
    alpha=0.1,
    beta=0.5,
    formula="full",
    normalize="none",
) -> float:
    mask = labels != -100
    d = np_divergence(s, t, divergence, tau, alpha, beta)  # [B, T]
    if ea:
        w = np_ea_weights(s, t, labels, tau_e, granularity, formula, normalize)
        if granularity == "sequence":
            w = np.broadcast_to(w[:, None], d.shape)
    else:
        w = np.ones_like(d)
    total = (w * d)[mask].sum()
    denom = mask.sum() if n is None else n
    return float(tau**2 * total / max(denom, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 torch reference (for gradients via autograd)
# ----------------------------------------------------------------------------------------------------------------------


def _t_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def torch64_divergence(s, t, name, tau=1.0, alpha=0.1, beta=0.5) -> torch.Tensor:
    ps, pt = torch.softmax(s.double() / tau, -1), torch.softmax(t.double() / tau, -1)
    if name == "fkl":
        return _t_kl(pt, ps)
    if name == "rkl":
        return _t_kl(ps, pt)
    if name == "skl":
        return _t_kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "srkl":
        return _t_kl(ps, (1 - alpha) * pt + alpha * ps)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * _t_kl(pt, m) + (1 - beta) * _t_kl(ps, m)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    raise AssertionError(name)


def torch64_loss(s, t, labels, divergence, tau, granularity, tau_e, ea=True) -> torch.Tensor:
    mask = labels != -100
    d = torch64_divergence(s, t, divergence, tau)
    if ea:
        w = torch.as_tensor(
            np_ea_weights(s.detach().double().numpy(), t.detach().double().numpy(), labels.numpy(), tau_e, granularity)
        )
        if granularity == "sequence":
            w = w[:, None].expand_as(d)
    else:
        w = torch.ones_like(d)
    return tau**2 * (w * d)[mask].sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures / helpers
# ----------------------------------------------------------------------------------------------------------------------


def make_logits(*shape: int, seed: int, scale: float = SCALE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()


def make_labels(b: int, t: int, seed: int) -> torch.Tensor:
    """Labels with a random prompt prefix and padding suffix masked (-100); row 1 fully masked when b > 2."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, t), generator=g)
    for row in range(b):
        start = int(torch.randint(0, t // 2, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        labels[row, :start] = -100
        labels[row, end:] = -100
    if b > 2:
        labels[1] = -100
    return labels


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


@pytest.fixture
def batch():
    s = make_logits(B, T, V, seed=0)
    t = make_logits(B, T, V, seed=1)
    labels = make_labels(B, T, seed=2)
    assert (labels != -100).sum() > 0
    return s, t, labels


# ----------------------------------------------------------------------------------------------------------------------
# token_entropy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPS)
def test_entropy_matches_reference(tau):
    x = make_logits(B, T, V, seed=3)
    h = token_entropy(x, tau)
    assert h.shape == (B, T)
    assert h.dtype == torch.float32
    np.testing.assert_allclose(h.numpy(), np_entropy(np64(x), tau), rtol=1e-4, atol=1e-5)


def test_entropy_uniform_is_log_v():
    x = torch.full((2, 4, V), 3.7)
    np.testing.assert_allclose(token_entropy(x).numpy(), math.log(V), rtol=1e-6)
    np.testing.assert_allclose(token_entropy(torch.zeros(V), 0.5).numpy(), math.log(V), rtol=1e-6)


def test_entropy_one_hot_is_zero():
    x = torch.zeros(3, V)
    x[torch.arange(3), torch.tensor([0, 5, V - 1])] = 100.0
    h = token_entropy(x)
    assert torch.all(h >= 0)
    assert torch.all(h < 1e-6)


def test_entropy_range():
    x = make_logits(4, 5, V, seed=4, scale=10.0)
    for tau in TEMPS:
        h = token_entropy(x, tau)
        assert torch.all(h >= -1e-6)
        assert torch.all(h <= math.log(V) + 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# token_divergence
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("div", DIVS)
def test_divergence_matches_reference(div, tau):
    s = make_logits(B, T, V, seed=5)
    t = make_logits(B, T, V, seed=6)
    d = token_divergence(s, t, div, temperature=tau)
    assert d.shape == (B, T)
    assert d.dtype == torch.float32
    np.testing.assert_allclose(d.numpy(), np_divergence(np64(s), np64(t), div, tau), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("div", "alpha", "beta"), [("skl", 0.3, 0.5), ("srkl", 0.7, 0.5), ("jsd", 0.1, 0.2)])
def test_divergence_nondefault_skew_and_beta(div, alpha, beta):
    s = make_logits(B, T, V, seed=7)
    t = make_logits(B, T, V, seed=8)
    d = token_divergence(s, t, div, temperature=1.0, skew_alpha=alpha, jsd_beta=beta)
    ref = np_divergence(np64(s), np64(t), div, 1.0, alpha, beta)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("div", DIVS)
def test_divergence_of_identical_distributions_is_zero(div):
    x = make_logits(B, T, V, seed=9)
    for tau in TEMPS:
        assert torch.allclose(token_divergence(x, x.clone(), div, temperature=tau), torch.zeros(B, T), atol=1e-6)
        # A constant shift of the logits leaves the distribution unchanged.
        assert torch.allclose(token_divergence(x, x + 5.0, div, temperature=tau), torch.zeros(B, T), atol=1e-5)


@pytest.mark.parametrize("div", DIVS)
def test_divergence_nonnegative(div):
    s = make_logits(8, 8, V, seed=10, scale=10.0)
    t = make_logits(8, 8, V, seed=11, scale=10.0)
    for tau in TEMPS:
        assert torch.all(token_divergence(s, t, div, temperature=tau) >= -1e-6)


def test_tvd_in_unit_interval():
    s = make_logits(8, 8, V, seed=12, scale=10.0)
    t = make_logits(8, 8, V, seed=13, scale=10.0)
    d = token_divergence(s, t, "tvd")
    assert torch.all(d >= 0) and torch.all(d <= 1 + 1e-6)
    # Disjoint (nearly one-hot on different tokens) distributions: tvd -> 1.
    a = torch.zeros(1, V)
    b = torch.zeros(1, V)
    a[0, 0], b[0, 1] = 100.0, 100.0
    assert torch.allclose(token_divergence(a, b, "tvd"), torch.ones(1), atol=1e-6)


def test_jsd_half_bounded_by_log2():
    s = make_logits(8, 8, V, seed=14, scale=10.0)
    t = make_logits(8, 8, V, seed=15, scale=10.0)
    d = token_divergence(s, t, "jsd", jsd_beta=0.5)
    assert torch.all(d <= math.log(2) + 1e-6)
    a = torch.zeros(1, V)
    b = torch.zeros(1, V)
    a[0, 0], b[0, 1] = 100.0, 100.0
    d = token_divergence(a, b, "jsd", jsd_beta=0.5)
    assert d.item() <= math.log(2) + 1e-6
    assert d.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("div", DIVS)
def test_divergence_gradients_match_float64_reference(div):
    s = make_logits(2, 4, V, seed=16, scale=3.0)
    t = make_logits(2, 4, V, seed=17, scale=3.0)
    cot = make_logits(2, 4, seed=18, scale=1.0)
    for tau in (0.5, 2.0):
        s32 = s.clone().requires_grad_(True)
        t32 = t.clone().requires_grad_(True)
        (token_divergence(s32, t32, div, temperature=tau) * cot).sum().backward()
        s64 = s.double().requires_grad_(True)
        t64 = t.double().requires_grad_(True)
        (torch64_divergence(s64, t64, div, tau) * cot.double()).sum().backward()
        torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t32.grad.double(), t64.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# ea_weights
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau_e", TEMPS)
def test_ea_weights_token_matches_formula(batch, tau_e):
    s, t, labels = batch
    w = ea_weights(s, t, labels, temperature=tau_e, granularity="token")
    assert w.shape == (B, T)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), np_ea_weights(np64(s), np64(t), None, tau_e, "token"), rtol=1e-4, atol=1e-6)
    # labels are irrelevant for token granularity
    torch.testing.assert_close(ea_weights(s, t, None, temperature=tau_e), w)


@pytest.mark.parametrize("tau_e", TEMPS)
def test_ea_weights_sequence_matches_formula_with_masking(batch, tau_e):
    s, t, labels = batch
    assert (labels[1] == -100).all()
    w = ea_weights(s, t, labels, temperature=tau_e, granularity="sequence")
    assert w.shape == (B,)
    assert w.dtype == torch.float32
    ref = np_ea_weights(np64(s), np64(t), labels.numpy(), tau_e, "sequence")
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-6)
    assert w[1].item() == 0.0  # fully masked row
    # Masked positions must not influence the sequence weight: scramble them.
    s2, t2 = s.clone(), t.clone()
    masked = labels == -100
    s2[masked] = make_logits(int(masked.sum()), V, seed=99)
    t2[masked] = make_logits(int(masked.sum()), V, seed=98)
    torch.testing.assert_close(ea_weights(s2, t2, labels, temperature=tau_e, granularity="sequence"), w)


def test_ea_weights_sequence_without_labels_uses_all_positions(batch):
    s, t, _ = batch
    w = ea_weights(s, t, None, temperature=1.0, granularity="sequence")
    ref = np_ea_weights(np64(s), np64(t), None, 1.0, "sequence")
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_ea_weights_known_values():
    # Uniform teacher and student: H_T = H_S = log V -> w = (log V + log V) / 2 = log V.
    u = torch.zeros(1, 2, V)
    np.testing.assert_allclose(ea_weights(u, u).numpy(), math.log(V), rtol=1e-6)
    # One-hot teacher: H_T = 0 -> w = 0 regardless of the student.
    onehot = torch.zeros(1, 2, V)
    onehot[..., 3] = 100.0
    assert torch.allclose(ea_weights(u, onehot), torch.zeros(1, 2), atol=1e-6)


@pytest.mark.parametrize("normalize", ["none", "mean"])
@pytest.mark.parametrize("formula", ["full", "teacher", "interaction"])
@pytest.mark.parametrize("gran", GRANS)
def test_ea_weight_formulas_and_normalisation_match_reference(batch, gran, formula, normalize):
    s, t, labels = batch
    w = ea_weights(s, t, labels, temperature=2.0, granularity=gran, formula=formula, normalize=normalize)
    ref = np_ea_weights(np64(s), np64(t), labels.numpy(), 2.0, gran, formula, normalize)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-4, atol=1e-6)
    mask = labels != -100
    per_token = w[mask] if gran == "token" else w[:, None].expand_as(mask)[mask]
    if normalize == "mean":  # only the relative weighting remains: mean 1 over the loss tokens
        assert per_token.mean().item() == pytest.approx(1.0, rel=1e-5)
    else:
        assert abs(per_token.mean().item() - 1.0) > 0.01  # the paper's weights are not of mean 1


def test_ea_weight_formulas_known_values():
    # Uniform student (H_S = log V), one peaked and one uniform teacher position.
    s = torch.zeros(1, 2, V)
    t = torch.zeros(1, 2, V)
    t[0, 0, 3] = 1000.0  # H_T = 0 exactly
    log_v = math.log(V)
    assert ea_weights(s, t, formula="teacher")[0].tolist() == pytest.approx([0.0, log_v], rel=1e-6)
    assert ea_weights(s, t, formula="interaction")[0].tolist() == pytest.approx([0.0, log_v], rel=1e-6)
    assert ea_weights(s, t, formula="full")[0].tolist() == pytest.approx([0.0, log_v], rel=1e-6)
    # mean normalisation: [0, log V] / (log V / 2) = [0, 2]
    assert ea_weights(s, t, normalize="mean")[0].tolist() == pytest.approx([0.0, 2.0], rel=1e-6)


def test_normalisation_of_all_zero_weights_is_finite():
    """Every teacher distribution one-hot: every weight is 0, there is nothing to normalise, and no NaN appears."""
    s = make_logits(2, 3, V, seed=5)
    t = torch.zeros(2, 3, V)
    t[..., 7] = 1000.0
    labels = torch.randint(0, V, (2, 3))
    for gran in GRANS:
        w = ea_weights(s, t, labels, granularity=gran, normalize="mean")
        assert torch.equal(w, torch.zeros_like(w))
        loss = distillation_loss(s, t, labels, ea_granularity=gran, ea_normalize="mean")
        assert loss.item() == 0.0


@pytest.mark.parametrize("gran", GRANS)
def test_ea_weights_detached(batch, gran):
    s, t, labels = batch
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    w = ea_weights(s, t, labels, granularity=gran)
    assert not w.requires_grad
    assert w.grad_fn is None


def test_ea_weights_temperature_changes_weight(batch):
    s, t, labels = batch
    w1 = ea_weights(s, t, labels, temperature=1.0)
    w2 = ea_weights(s, t, labels, temperature=2.0)
    assert not torch.allclose(w1, w2)


# ----------------------------------------------------------------------------------------------------------------------
# distillation_loss: values
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("div", DIVS)
def test_loss_plain_kd_matches_reference(batch, div, tau):
    s, t, labels = batch
    loss = distillation_loss(s, t, labels, div, temperature=tau, ea=False)
    assert loss.shape == ()
    assert loss.dtype == torch.float32
    ref = np_loss(np64(s), np64(t), labels.numpy(), div, tau, ea=False)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("tau_e", [None, 1.0, 0.5])
@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_loss_ea_matches_reference(batch, div, gran, tau, tau_e):
    s, t, labels = batch
    loss = distillation_loss(
        s, t, labels, div, temperature=tau, ea=True, ea_granularity=gran, entropy_temperature=tau_e
    )
    assert loss.dtype == torch.float32
    ref = np_loss(np64(s), np64(t), labels.numpy(), div, tau, True, gran, 2.0 if tau_e is None else tau_e)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("formula", ["full", "teacher", "interaction"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_loss_normalised_weights_match_reference(batch, div, gran, formula):
    """ea_normalize='mean': w / mean(w) over the loss tokens (sequence level: token-weighted), every divergence."""
    s, t, labels = batch
    kwargs = dict(temperature=1.5, ea=True, ea_granularity=gran, entropy_temperature=2.0, ea_formula=formula)
    loss = distillation_loss(s, t, labels, div, ea_normalize="mean", **kwargs)
    ref = np_loss(np64(s), np64(t), labels.numpy(), div, 1.5, True, gran, 2.0, formula=formula, normalize="mean")
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # Normalisation removes the scale: the normalised loss differs from the paper's by exactly the mean weight.
    raw = distillation_loss(s, t, labels, div, **kwargs)
    w = ea_weights(s, t, labels, 2.0, gran, formula)
    mask = labels != -100
    mean_w = (w[mask] if gran == "token" else w[:, None].expand_as(mask)[mask]).mean()
    torch.testing.assert_close(loss * mean_w, raw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gran", GRANS)
def test_normalised_weights_get_no_gradient(batch, gran):
    """The normaliser is detached like the weights: the gradient is the weighted divergence's, divided by mean(w)."""
    s, t, labels = batch
    s1 = s.clone().requires_grad_(True)
    distillation_loss(s1, t, labels, ea_granularity=gran, ea_normalize="mean").backward()
    w = ea_weights(s, t, labels, 2.0, gran, normalize="mean")
    s2 = s.clone().requires_grad_(True)
    d = token_divergence(s2, t, "fkl")
    w_full = w if gran == "token" else w[:, None].expand_as(d)
    mask = labels != -100
    ((w_full * d)[mask].sum() / mask.sum()).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gran", GRANS)
def test_loss_equals_weighted_sum_of_public_pieces(batch, gran):
    """loss == tau^2 * sum_n w_n * d_n / N, with w and d from the public functions (weights at tau', d at tau)."""
    s, t, labels = batch
    tau, tau_e = 2.0, 0.5
    mask = labels != -100
    d = token_divergence(s, t, "fkl", temperature=tau)
    w = ea_weights(s, t, labels, temperature=tau_e, granularity=gran)
    if gran == "sequence":
        w = w[:, None].expand_as(d)
    expected = tau**2 * (w * d)[mask].sum() / mask.sum()
    loss = distillation_loss(s, t, labels, "fkl", temperature=tau, ea_granularity=gran, entropy_temperature=tau_e)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gran", GRANS)
def test_entropy_temperature_default_and_independence(batch, gran):
    s, t, labels = batch
    kw = {"divergence": "fkl", "ea_granularity": gran}
    default = distillation_loss(s, t, labels, temperature=1.0, **kw)
    explicit = distillation_loss(s, t, labels, temperature=1.0, entropy_temperature=2.0, **kw)
    other = distillation_loss(s, t, labels, temperature=1.0, entropy_temperature=1.0, **kw)
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, other)
    # The weights depend on tau' only: changing tau leaves the weight statistics unchanged.
    _, st1 = distillation_loss(s, t, labels, temperature=0.5, entropy_temperature=1.5, return_stats=True, **kw)
    _, st2 = distillation_loss(s, t, labels, temperature=3.0, entropy_temperature=1.5, return_stats=True, **kw)
    for key in ("teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min", "ea_weight_max"):
        torch.testing.assert_close(st1[key], st2[key])


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", ("fkl", "jsd"))
def test_num_items_in_batch_int_and_tensor(batch, div, gran):
    s, t, labels = batch
    n = 17
    ref = np_loss(np64(s), np64(t), labels.numpy(), div, 2.0, True, gran, 2.0, n=n)
    for n_arg in (n, torch.tensor(n), torch.tensor(n, dtype=torch.int32), torch.tensor(float(n))):
        loss = distillation_loss(s, t, labels, div, temperature=2.0, ea_granularity=gran, num_items_in_batch=n_arg)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    local = distillation_loss(s, t, labels, div, temperature=2.0, ea_granularity=gran)
    local_n = int((labels != -100).sum())
    assert local.item() * local_n / n == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("gran", GRANS)
def test_return_stats(batch, gran):
    s, t, labels = batch
    tau_e = 1.5
    loss, stats = distillation_loss(
        s, t, labels, "rkl", temperature=0.5, ea_granularity=gran, entropy_temperature=tau_e, return_stats=True
    )
    plain = distillation_loss(s, t, labels, "rkl", temperature=0.5, ea_granularity=gran, entropy_temperature=tau_e)
    torch.testing.assert_close(loss, plain)
    expected_keys = {"teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min", "ea_weight_max"}
    assert expected_keys | {"num_tokens"} <= set(stats)
    mask = labels.numpy() != -100
    assert int(stats["num_tokens"]) == int(mask.sum())
    h_t = np_entropy(np64(t), tau_e)[mask]
    h_s = np_entropy(np64(s), tau_e)[mask]
    assert float(stats["teacher_entropy"]) == pytest.approx(h_t.mean(), rel=1e-4)
    assert float(stats["student_entropy"]) == pytest.approx(h_s.mean(), rel=1e-4)
    for key in expected_keys:
        assert not stats[key].requires_grad
    w = np_ea_weights(np64(s), np64(t), labels.numpy(), tau_e, gran)
    if gran == "token":
        w_tok = w[mask]
        assert float(stats["ea_weight_mean"]) == pytest.approx(w_tok.mean(), rel=1e-4)
    else:
        w_tok = w[mask.any(-1)]  # sequences that carry loss
    assert float(stats["ea_weight_min"]) == pytest.approx(w_tok.min(), rel=1e-4)
    assert float(stats["ea_weight_max"]) == pytest.approx(w_tok.max(), rel=1e-4)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("normalize", ["none", "mean"])
def test_divergence_sums_give_the_effective_scale(batch, gran, normalize):
    """``divergence_sum = sum d_n`` and ``weighted_divergence_sum = sum w_n d_n`` (the formula's weights, before any
    normalisation) against float64 numpy; their ratio is EA's effective scale, which is what the EA loss divides by
    when compared with plain KD: ``EA = tau^2 * sum w d / N = (weighted / divergence) * KD``."""
    s, t, labels = batch
    tau, tau_e = 0.8, 1.5
    kwargs = {"temperature": tau, "ea_granularity": gran, "entropy_temperature": tau_e, "ea_normalize": normalize}
    _, stats = distillation_loss(s, t, labels, "jsd", return_stats=True, **kwargs)
    mask = labels.numpy() != -100
    d = np_divergence(np64(s), np64(t), "jsd", tau)[mask]
    w = np_ea_weights(np64(s), np64(t), labels.numpy(), tau_e, gran)
    w_tok = w[mask] if gran == "token" else np.broadcast_to(w[:, None], mask.shape)[mask]
    assert float(stats["divergence_sum"]) == pytest.approx(d.sum(), rel=1e-4)
    assert float(stats["weighted_divergence_sum"]) == pytest.approx((w_tok * d).sum(), rel=1e-4)
    if normalize == "none":
        ea = distillation_loss(s, t, labels, "jsd", **kwargs)
        kd = distillation_loss(s, t, labels, "jsd", temperature=tau, ea=False)
        scale = stats["weighted_divergence_sum"] / stats["divergence_sum"]
        torch.testing.assert_close(ea, scale * kd, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# distillation_loss: gradients
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_loss_gradient_matches_float64_autograd(batch, div, gran):
    s, t, labels = batch
    for tau, tau_e, ea in ((0.5, 2.0, True), (2.0, 2.0, True), (1.0, 1.0, False)):
        s32 = s.clone().requires_grad_(True)
        distillation_loss(
            s32, t, labels, div, temperature=tau, ea=ea, ea_granularity=gran, entropy_temperature=tau_e
        ).backward()
        s64 = s.double().requires_grad_(True)
        torch64_loss(s64, t.double(), labels, div, tau, gran, tau_e, ea=ea).backward()
        assert s32.grad.dtype == torch.float32
        torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
        assert torch.all(s32.grad[labels == -100] == 0)  # masked positions get no gradient


def _accum_setup(seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    b, t, h = 8, 10, 16
    hidden = torch.randn(b, t, h, generator=g)
    teacher = torch.randn(b, t, V, generator=g) * SCALE
    labels = torch.randint(0, V, (b, t), generator=g)
    lengths = [10, 1, 7, 0, 4, 9, 2, 5]  # varying number of loss tokens, including an empty sequence
    starts = [0, 3, 1, 0, 5, 0, 8, 2]
    for row, (st, ln) in enumerate(zip(starts, lengths)):
        labels[row, :st] = -100
        labels[row, st + ln :] = -100
    assert [int(x) for x in (labels != -100).sum(-1)] == lengths
    layer = torch.nn.Linear(h, V)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(V, h, generator=g) * 1.5)
        layer.bias.copy_(torch.randn(V, generator=g))
    return hidden, teacher, labels, layer


@pytest.mark.parametrize("n_as_tensor", [False, True])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_gradient_accumulation_equivalence(div, gran, n_as_tensor):
    hidden, teacher, labels, layer = _accum_setup()
    kw = {"divergence": div, "temperature": 2.0, "ea_granularity": gran, "entropy_temperature": 1.0}

    # One batch of 8.
    layer.zero_grad()
    logits_full = layer(hidden)
    logits_full.retain_grad()
    loss_full = distillation_loss(logits_full, teacher, labels, **kw)
    loss_full.backward()
    grad_w_full = layer.weight.grad.clone()
    grad_b_full = layer.bias.grad.clone()
    grad_logits_full = logits_full.grad.clone()

    # Two micro-batches of 4, N = total token count of all 8.
    total = int((labels != -100).sum())
    n_arg = torch.tensor(total) if n_as_tensor else total
    layer.zero_grad()
    loss_sum = torch.zeros(())
    grad_logits_parts = []
    for sl in (slice(0, 4), slice(4, 8)):
        logits = layer(hidden[sl])
        logits.retain_grad()
        loss = distillation_loss(logits, teacher[sl], labels[sl], num_items_in_batch=n_arg, **kw)
        loss.backward()
        loss_sum = loss_sum + loss.detach()
        grad_logits_parts.append(logits.grad)

    torch.testing.assert_close(loss_sum, loss_full.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat(grad_logits_parts), grad_logits_full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.weight.grad, grad_w_full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, grad_b_full, rtol=1e-5, atol=1e-6)
    assert grad_w_full.abs().max() > 1e-4  # the comparison is not vacuous


@pytest.mark.parametrize("ea", [True, False])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_no_loss_tokens_gives_exact_zero(div, gran, ea):
    s = make_logits(2, 4, V, seed=30).requires_grad_(True)
    t = make_logits(2, 4, V, seed=31)
    labels = torch.full((2, 4), -100)
    for n_arg in (None, 0, 5, torch.tensor(5)):
        s.grad = None
        loss = distillation_loss(
            s, t, labels, div, temperature=2.0, ea=ea, ea_granularity=gran, num_items_in_batch=n_arg
        )
        assert torch.isfinite(loss)
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad is not None
        assert torch.isfinite(s.grad).all()
        assert torch.all(s.grad == 0)
    loss, stats = distillation_loss(s, t, labels, div, ea=ea, ea_granularity=gran, return_stats=True)
    assert loss.item() == 0.0
    assert int(stats["num_tokens"]) == 0
    for value in stats.values():
        assert torch.isfinite(torch.as_tensor(value)).all()


# ----------------------------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("div", DIVS)
def test_bf16_inputs_give_fp32_outputs(batch, div, gran):
    s, t, labels = batch
    s16, t16 = s.bfloat16(), t.bfloat16()
    s_r, t_r = s16.float(), t16.float()  # the bf16-rounded values in fp32

    assert token_entropy(s16).dtype == torch.float32
    torch.testing.assert_close(token_entropy(s16, 2.0), token_entropy(s_r, 2.0), rtol=1e-5, atol=1e-6)

    d16 = token_divergence(s16, t16, div, temperature=0.5)
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, token_divergence(s_r, t_r, div, temperature=0.5), rtol=1e-5, atol=1e-6)

    w16 = ea_weights(s16, t16, labels, granularity=gran)
    assert w16.dtype == torch.float32
    torch.testing.assert_close(w16, ea_weights(s_r, t_r, labels, granularity=gran), rtol=1e-5, atol=1e-6)

    s16 = s16.clone().requires_grad_(True)
    loss16 = distillation_loss(s16, t16, labels, div, temperature=2.0, ea_granularity=gran)
    assert loss16.dtype == torch.float32
    loss32 = distillation_loss(s_r, t_r, labels, div, temperature=2.0, ea_granularity=gran)
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)
    ref = np_loss(np64(s_r), np64(t_r), labels.numpy(), div, 2.0, True, gran, 2.0)
    assert loss16.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    loss16.backward()
    assert s16.grad is not None and torch.isfinite(s16.grad.float()).all()


# ----------------------------------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------------------------------

_NOT_ENTROPY_TEMP = r"(?<!entropy_)temperature"


@pytest.mark.parametrize("bad", ["kl", "FKL", "", "js"])
def test_invalid_divergence(batch, bad):
    s, t, labels = batch
    with pytest.raises(ValueError, match="divergence"):
        token_divergence(s, t, bad)
    with pytest.raises(ValueError, match="divergence"):
        distillation_loss(s, t, labels, bad)


@pytest.mark.parametrize("bad", ["tokens", "seq", "batch", ""])
def test_invalid_granularity(batch, bad):
    s, t, labels = batch
    with pytest.raises(ValueError, match="granularity"):
        ea_weights(s, t, labels, granularity=bad)
    with pytest.raises(ValueError, match="granularity"):
        distillation_loss(s, t, labels, ea_granularity=bad)


@pytest.mark.parametrize(("key", "value"), [("ea_formula", "both"), ("ea_normalize", "sum")])
def test_invalid_ea_options(batch, key, value):
    s, t, labels = batch
    with pytest.raises(ValueError, match=f"{key}='{value}' is not supported"):
        distillation_loss(s, t, labels, **{key: value})
    with pytest.raises(ValueError, match="is not supported"):
        ea_weights(s, t, labels, **{key.removeprefix("ea_"): value})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_temperatures(batch, bad):
    s, t, labels = batch
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(s, bad)
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s, t, "fkl", temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        ea_weights(s, t, labels, temperature=bad)
    with pytest.raises(ValueError, match=_NOT_ENTROPY_TEMP) as exc:
        distillation_loss(s, t, labels, temperature=bad)
    assert "entropy_temperature" not in str(exc.value)
    with pytest.raises(ValueError, match="entropy_temperature"):
        distillation_loss(s, t, labels, temperature=1.0, entropy_temperature=bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
@pytest.mark.parametrize("div", ("skl", "srkl"))
def test_invalid_skew_alpha(batch, div, bad):
    s, t, labels = batch
    with pytest.raises(ValueError, match="skew_alpha"):
        token_divergence(s, t, div, skew_alpha=bad)
    with pytest.raises(ValueError, match="skew_alpha"):
        distillation_loss(s, t, labels, div, skew_alpha=bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_invalid_jsd_beta(batch, bad):
    s, t, labels = batch
    with pytest.raises(ValueError, match="jsd_beta"):
        token_divergence(s, t, "jsd", jsd_beta=bad)
    with pytest.raises(ValueError, match="jsd_beta"):
        distillation_loss(s, t, labels, "jsd", jsd_beta=bad)


def test_shape_mismatch(batch):
    s, t, labels = batch
    with pytest.raises(ValueError):
        token_divergence(s, t[..., :-1])
    with pytest.raises(ValueError):
        ea_weights(s, t[..., :-1])
    with pytest.raises(ValueError):
        ea_weights(s, t[:, :-1], labels[:, :-1], granularity="sequence")
    with pytest.raises(ValueError):
        distillation_loss(s, t[..., :-1], labels)
    with pytest.raises(ValueError):
        distillation_loss(s, t, labels[:, :-1])
    with pytest.raises(ValueError):
        distillation_loss(s, t, labels[:1])


@pytest.mark.parametrize("temperature", [0.05, 20.0])
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"])
def test_extreme_temperatures_stay_finite(temperature, divergence):
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 50) * 30).requires_grad_(True)
    teacher = torch.randn(2, 5, 50) * 30
    labels = torch.randint(0, 50, (2, 5))
    for tau_e in (0.05, 20.0):
        loss = distillation_loss(student, teacher, labels, divergence=divergence, temperature=temperature,
                                 entropy_temperature=tau_e, ea_granularity="sequence")
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()


def test_nan_logits_propagate_instead_of_being_masked():
    """A NaN logit must surface as a NaN loss (so the trainer can report it), not be silently zeroed."""
    student = torch.randn(1, 3, 8)
    teacher = torch.randn(1, 3, 8)
    teacher[0, 1, 2] = float("nan")
    labels = torch.zeros(1, 3, dtype=torch.long)
    for divergence in ("fkl", "rkl", "skl", "srkl", "jsd", "tvd"):
        assert torch.isnan(distillation_loss(student, teacher, labels, divergence=divergence, ea=False))
    assert torch.isnan(token_entropy(teacher)[0, 1])

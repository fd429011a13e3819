"""Exactness tests for :func:`eakd_llm.loss.chunked.fused_distillation_loss` against the full-logits reference.

The reference materialises the logits ``hidden @ weight.T + bias`` (then scale/softcap) of both models and runs plain
autograd through ``F.cross_entropy`` (sum / N) and :func:`eakd_llm.loss.distillation.distillation_loss`, which is itself
tested against independent float64 references in ``test_losses.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import distillation_loss_kw as distillation_loss
from loss_helpers import fused_loss_kw as fused_distillation_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import eakd_llm.loss.chunked as chunked
from eakd_llm.loss.distillation import loss_denominator

DIVS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")
GRANS = ("token", "sequence")
B, T = 4, 11
H_S, H_T = 8, 12
V_S, V_T = 37, 41  # teacher has padding rows; 37 is not divisible by any chunk size used
STATS_KEYS = {"teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min", "ea_weight_max", "num_tokens",
              "divergence_sum", "weighted_divergence_sum"}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is several times faster than a contended thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_labels(b: int, t: int, vocab: int, seed: int, empty_rows: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Random prompt prefix / padding suffix masked, some rows fully masked, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    for row in range(b):
        start = int(torch.randint(0, t // 3, (1,), generator=g))
        end = int(torch.randint(start + t // 2, t + 1, (1,), generator=g))
        labels[row, :start] = -100
        labels[row, end:] = -100
    labels[list(r for r in empty_rows if r < b)] = -100
    labels[0, -1] = 5  # row 0 always long
    return labels


def make_inputs(seed: int = 0, b: int = B, t: int = T, v_s: int = V_S, v_t: int = V_T, bias: bool = True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    inputs = {
        "student_hidden": rnd(b, t, H_S, scale=1.5),
        "student_weight": rnd(v_s, H_S),
        "teacher_hidden": rnd(b, t, H_T, scale=1.5),
        "teacher_weight": rnd(v_t, H_T),
        "labels": make_labels(b, t, min(v_s, v_t), seed + 1),
    }
    if bias:
        inputs["student_bias"] = rnd(v_s)
        inputs["teacher_bias"] = rnd(v_t)
    return inputs


def _transform(z, scale, softcap):
    z = z * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def reference_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    *,
    student_bias=None,
    teacher_bias=None,
    vocab_size=None,
    kd_ratio=0.5,
    kd_scale=1.0,
    num_items_in_batch=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
    chunk_size=None,  # accepted (and ignored) so both functions take the same arguments
    compile=None,
    **kd_kwargs,
):
    """Full logits + F.cross_entropy (sum / N) + distillation_loss, plain autograd, fp32 on upcast inputs."""
    z_s = student_hidden.float() @ student_weight.float().T
    if student_bias is not None:
        z_s = z_s + student_bias.float()
    z_s = _transform(z_s, student_logit_scale, student_softcap)
    n = loss_denominator((labels != -100).sum(), num_items_in_batch)
    ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss = (1 - kd_ratio) * ce / n
    if kd_ratio == 0:
        return loss
    with torch.no_grad():
        z_t = teacher_hidden.float() @ teacher_weight.float().T
        if teacher_bias is not None:
            z_t = z_t + teacher_bias.float()
        z_t = _transform(z_t, teacher_logit_scale, teacher_softcap)
    v = vocab_size or min(z_s.shape[-1], z_t.shape[-1])
    kd = distillation_loss(z_s[..., :v], z_t[..., :v], labels, num_items_in_batch=n, **kd_kwargs)
    return loss + kd_ratio * kd_scale * kd


STUDENT_KEYS = ("student_hidden", "student_weight", "student_bias")


def loss_and_grads(fn, inputs, **kwargs):
    loss = fn(**inputs, **kwargs)
    wrt = [inputs[k] for k in STUDENT_KEYS if k in inputs and inputs[k].requires_grad]
    grads = torch.autograd.grad(loss, wrt) if loss.requires_grad else [torch.zeros_like(w) for w in wrt]
    return loss.detach(), grads


def assert_matches_reference(inputs, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, **kwargs):
    ref_loss, ref_grads = loss_and_grads(reference_loss, inputs, **kwargs)
    loss, grads = loss_and_grads(fused_distillation_loss, inputs, **kwargs)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(got / scale, want / scale, rtol=grad_rtol, atol=grad_rtol)
    return loss


# ----------------------------------------------------------------------------------------------------------------------
# Exactness: loss and gradients
# ----------------------------------------------------------------------------------------------------------------------

CASES = list(itertools.product(DIVS, GRANS, (True, False), (0.0, 0.5, 1.0)))


@pytest.mark.parametrize(("div", "gran", "ea", "kd_ratio"), CASES)
def test_matches_reference(div, gran, ea, kd_ratio):
    index = CASES.index((div, gran, ea, kd_ratio))
    chunk_size = (1, 7, 1000)[index % 3]  # 1: every token a chunk; 7: rows split; 1000 > N: one chunk
    tau, tau_e = ((1.0, 1.0), (1.5, 2.0), (0.7, None))[(index // 3) % 3]
    inputs = make_inputs(seed=index)
    assert (inputs["labels"] != -100).sum() > chunk_size or chunk_size == 1000
    assert_matches_reference(
        inputs,
        kd_ratio=kd_ratio,
        divergence=div,
        ea=ea,
        ea_granularity=gran,
        temperature=tau,
        entropy_temperature=tau_e,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize(
    ("div", "gran", "kd_ratio", "bias"),
    [("fkl", "token", 0.5, True), ("jsd", "sequence", 0.3, False), ("rkl", "sequence", 1.0, True)],
)
def test_compiled_chunk_maths_matches_reference(div, gran, kd_ratio, bias):
    """compile=True: the per-chunk maths through torch.compile (dynamic chunk length; chunk 3 splits rows, so sequence
    granularity takes the deferred-weight path with two gradients of one compiled graph)."""
    inputs = make_inputs(seed=3, bias=bias)
    kwargs = dict(kd_ratio=kd_ratio, divergence=div, ea=True, ea_granularity=gran, entropy_temperature=2.0,
                  chunk_size=3)
    compiled = assert_matches_reference(inputs, compile=True, **kwargs)
    eager, _ = loss_and_grads(fused_distillation_loss, inputs, **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    """A compiler that fails (no C compiler, an inductor bug) costs a warning, not the run: the eager maths takes over
    for the rest of the process and gives the same loss and gradients."""
    monkeypatch.setattr(chunked, "_COMPILE_FAILURE", None)
    calls = []

    def broken(*key):
        def fail(*args):
            calls.append(1)
            raise RuntimeError("backend compiler failed: no working C compiler found")
        return fail

    monkeypatch.setattr(chunked, "_compiled_chunk_terms", broken)
    inputs = make_inputs(seed=5)
    kwargs = dict(kd_ratio=0.5, divergence="fkl", ea_granularity="token", chunk_size=6)
    with caplog.at_level("WARNING", logger="eakd_llm.loss.chunked"):
        assert_matches_reference(inputs, compile=True, **kwargs)
        assert_matches_reference(inputs, compile=True, **kwargs)
    assert len(calls) == 1  # tried once, then eager for the process
    assert caplog.text.count("compile_loss: torch.compile of the fused loss's chunk maths failed") == 1
    assert "no working C compiler" in caplog.text


NORM_CASES = list(itertools.product(DIVS, GRANS, ("full", "teacher", "interaction")))


@pytest.mark.parametrize(("div", "gran", "formula"), NORM_CASES)
def test_normalised_weights_formulas_and_kd_scale_match_reference(div, gran, formula):
    """ea_normalize='mean' (the batch mean is known only after the last chunk: the KD gradient is accumulated apart
    and rescaled), the weight ablation's formulas and kd_scale, against the full-logits reference; chunk sizes that
    split rows (deferred row weights too) and one chunk; CE kept, pure KD, and gradient accumulation's N."""
    index = NORM_CASES.index((div, gran, formula))
    inputs = make_inputs(seed=40 + index)
    for chunk_size, kd_ratio, n in ((3, 0.5, None), (1000, 0.3, 97), (4, 1.0, None)):
        assert_matches_reference(
            inputs, kd_ratio=kd_ratio, kd_scale=(1.0, 2.5)[index % 2], divergence=div, ea_granularity=gran,
            ea_formula=formula, ea_normalize="mean", entropy_temperature=2.0, chunk_size=chunk_size,
            num_items_in_batch=n,
        )


def test_normalised_loss_is_the_paper_loss_over_the_mean_weight():
    inputs = make_inputs(seed=7)
    kwargs = dict(kd_ratio=1.0, divergence="fkl", entropy_temperature=2.0, chunk_size=5, return_stats=True)
    raw, stats = fused_distillation_loss(**inputs, **kwargs)
    normalised, norm_stats = fused_distillation_loss(**inputs, ea_normalize="mean", **kwargs)
    torch.testing.assert_close(normalised * stats["ea_weight_mean"], raw, rtol=1e-5, atol=1e-7)
    # the logged weight statistics stay those of the paper's formula (the scale EA would apply)
    torch.testing.assert_close(norm_stats["ea_weight_mean"], stats["ea_weight_mean"])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 16, 26, 10_000])
@pytest.mark.parametrize("gran", GRANS)
def test_chunk_sizes(chunk_size, gran):
    inputs = make_inputs(seed=3, b=5, t=26)  # rows of up to 26 loss tokens: split by every chunk size but 10_000
    assert_matches_reference(inputs, kd_ratio=0.5, divergence="jsd", ea_granularity=gran, chunk_size=chunk_size)


@pytest.mark.parametrize("kd_ratio", [0.3, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_sequence_granularity_rows_longer_than_chunk(kd_ratio, bias):
    """Rows spanning several chunks take the deferred-row-weight path; rows that fit a chunk are kept whole."""
    g = torch.Generator().manual_seed(11)
    inputs = make_inputs(seed=11, b=6, t=30, bias=bias)
    labels = torch.randint(0, V_S, (6, 30), generator=g)
    labels[0, :2] = -100  # 28 tokens: 4 chunks of 8
    labels[1, :] = -100
    labels[2, :27] = -100  # 3 tokens
    labels[3, 10:] = -100  # 10 tokens: 2 chunks
    labels[5, :15] = -100  # 15 tokens
    inputs["labels"] = labels
    for chunk_size in (4, 8, 9):
        assert_matches_reference(
            inputs, kd_ratio=kd_ratio, divergence="fkl", ea_granularity="sequence", chunk_size=chunk_size
        )


def test_plan_chunks_keeps_rows_whole():
    # rows of 3, 0, 10, 2 tokens -> starts [0, 3, 3, 13, 15]
    starts = [0, 3, 3, 13, 15]
    assert chunked._plan_chunks(starts, 7, keep_rows_whole=False) == [(0, 7), (7, 14), (14, 15)]
    assert chunked._plan_chunks(starts, 7, keep_rows_whole=True) == [(0, 3), (3, 10), (10, 15)]
    assert chunked._plan_chunks(starts, 5, keep_rows_whole=True) == [(0, 3), (3, 8), (8, 13), (13, 15)]
    assert chunked._plan_chunks(starts, 100, keep_rows_whole=True) == [(0, 15)]
    assert chunked._plan_chunks([0, 0], 4, keep_rows_whole=True) == []


@pytest.mark.parametrize(("tau", "tau_e"), [(1.0, 1.0), (2.0, 2.0), (0.5, 3.0), (3.0, None)])
@pytest.mark.parametrize("gran", GRANS)
def test_temperatures(tau, tau_e, gran):
    inputs = make_inputs(seed=5)
    for div in ("fkl", "srkl"):
        assert_matches_reference(
            inputs, divergence=div, temperature=tau, entropy_temperature=tau_e, ea_granularity=gran, chunk_size=5
        )


@pytest.mark.parametrize(("v_s", "v_t", "vocab_size"), [(37, 41, None), (41, 37, None), (37, 37, None), (41, 45, 30)])
def test_vocabularies(v_s, v_t, vocab_size):
    """Teacher or student with padding rows (KD on the first min(V_s, V_t) columns, CE on all V_s), explicit V."""
    inputs = make_inputs(seed=6, v_s=v_s, v_t=v_t)
    assert_matches_reference(inputs, vocab_size=vocab_size, ea_granularity="sequence", chunk_size=4)
    assert_matches_reference(inputs, vocab_size=vocab_size, kd_ratio=1.0, divergence="rkl", chunk_size=6)


@pytest.mark.parametrize(("div", "alpha", "beta"), [("skl", 0.3, 0.5), ("srkl", 0.7, 0.5), ("jsd", 0.1, 0.2)])
def test_skew_and_beta(div, alpha, beta):
    assert_matches_reference(make_inputs(seed=7), divergence=div, skew_alpha=alpha, jsd_beta=beta, chunk_size=3)


@pytest.mark.parametrize(
    ("s_scale", "t_scale", "s_cap", "t_cap"), [(0.5, 1.0, None, None), (1.0, 2.0, 5.0, None), (1.7, 0.8, 3.0, 4.0)]
)
def test_logit_scale_and_softcap(s_scale, t_scale, s_cap, t_cap):
    for gran in GRANS:
        assert_matches_reference(
            make_inputs(seed=8),
            ea_granularity=gran,
            student_logit_scale=s_scale,
            teacher_logit_scale=t_scale,
            student_softcap=s_cap,
            teacher_softcap=t_cap,
            chunk_size=4,
        )


@pytest.mark.parametrize("gran", GRANS)
def test_num_items_in_batch_gradient_accumulation(gran):
    """Two half batches with the global N: losses and gradients sum to the full batch's (and equal the reference)."""
    inputs = make_inputs(seed=9, b=6)
    n_total = int((inputs["labels"] != -100).sum())
    kwargs = {"kd_ratio": 0.5, "divergence": "jsd", "ea_granularity": gran, "chunk_size": 4}
    full_loss, full_grads = loss_and_grads(fused_distillation_loss, inputs, **kwargs)
    halves = []
    for rows, n in ((slice(0, 3), n_total), (slice(3, 6), torch.tensor(n_total))):
        half = {k: (v[rows] if k in ("student_hidden", "teacher_hidden", "labels") else v) for k, v in inputs.items()}
        assert_matches_reference(half, num_items_in_batch=n, **kwargs)
        halves.append(loss_and_grads(fused_distillation_loss, half, num_items_in_batch=n, **kwargs))
    torch.testing.assert_close(halves[0][0] + halves[1][0], full_loss, rtol=1e-5, atol=1e-6)
    # hidden-state gradients are per row; weight/bias gradients add up
    torch.testing.assert_close(torch.cat([halves[0][1][0], halves[1][1][0]]), full_grads[0], rtol=1e-5, atol=1e-7)
    for i in (1, 2):
        torch.testing.assert_close(halves[0][1][i] + halves[1][1][i], full_grads[i], rtol=1e-5, atol=1e-6)


def test_bf16_inputs():
    inputs = make_inputs(seed=10)
    bf16 = {k: (v.detach().bfloat16().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    for gran in GRANS:
        # The reference upcasts the same bf16 values; gradients come back in bf16 (one bf16 rounding).
        loss = assert_matches_reference(bf16, ea_granularity=gran, chunk_size=5, rtol=1e-4, atol=1e-5, grad_rtol=1e-2)
        assert loss.dtype == torch.float32
    loss = fused_distillation_loss(**bf16, chunk_size=5)
    loss.backward()
    assert bf16["student_hidden"].grad.dtype == torch.bfloat16
    assert bf16["student_weight"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("compile", [False, True])
def test_low_precision_gemm_path_matches_hf_style_logits(monkeypatch, compile):
    """The CUDA path for bf16 inputs, forced on CPU: bf16 GEMMs return bf16 logits (as an HF lm_head does), upcast for
    the fp32 maths, and the bf16 logit gradient feeds the two backward GEMMs. Reference: HF-style bf16 logits
    ``F.linear`` then ``.float()``, CE + distillation_loss, plain autograd."""
    monkeypatch.setattr(chunked, "_low_precision_gemms", lambda device: True)
    inputs = make_inputs(seed=21)
    bf16 = {k: (v.detach().bfloat16().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    kwargs = dict(kd_ratio=0.5, divergence="fkl", ea=True, ea_granularity="sequence", chunk_size=4)

    def hf_style(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
                 kd_ratio, chunk_size, **kd):
        z_s = F.linear(student_hidden, student_weight, student_bias).float()
        with torch.no_grad():
            z_t = F.linear(teacher_hidden, teacher_weight, teacher_bias).float()
        n = (labels != -100).sum()
        ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        v = min(z_s.shape[-1], z_t.shape[-1])
        kd_loss = distillation_loss(z_s[..., :v], z_t[..., :v], labels, num_items_in_batch=n, **kd)
        return (1 - kd_ratio) * ce / n + kd_ratio * kd_loss

    ref_loss, ref_grads = loss_and_grads(hf_style, bf16, **kwargs)
    loss, grads = loss_and_grads(fused_distillation_loss, bf16, compile=compile, **kwargs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2)


def test_fp16_logit_gradients_do_not_underflow_with_a_large_token_count(monkeypatch):
    """fp16 GEMMs (the CUDA path, forced on CPU) with N = 10^7 global loss tokens: d(loss)/d(logits) ~ 1e-9 is
    below fp16's normal range, so the chunk gradient must be rounded before dividing by N. With a loss scale of 2^20
    (as fp16 training applies) the gradients match the fp32 reference."""
    monkeypatch.setattr(chunked, "_low_precision_gemms", lambda device: True)
    inputs = make_inputs(seed=23, bias=False)
    fp16 = {k: (v.detach().half().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    fp32 = {k: (v.detach().float().requires_grad_() if v.is_floating_point() else v) for k, v in fp16.items()}
    kwargs = dict(kd_ratio=0.5, num_items_in_batch=10_000_000, chunk_size=5)
    scale = 2.0**20
    _, grads = loss_and_grads(lambda **k: fused_distillation_loss(**k) * scale, fp16, **kwargs)
    _, ref_grads = loss_and_grads(lambda **k: reference_loss(**k) * scale, fp32, **kwargs)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float16
        top = want.abs().max()
        assert top > 1e-3  # the scaled gradients are in fp16's normal range
        torch.testing.assert_close(got.float() / top, want / top, rtol=0, atol=2e-2)


def test_autocast_matches_fp32_on_cpu():
    inputs = make_inputs(seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_distillation_loss(**inputs, chunk_size=4)
    torch.testing.assert_close(loss, reference_loss(**inputs), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Gradient plumbing
# ----------------------------------------------------------------------------------------------------------------------


def test_no_loss_tokens_gives_zero_and_zero_grads():
    inputs = make_inputs(seed=13)
    inputs["labels"] = torch.full((B, T), -100)
    for gran in GRANS:
        loss, stats = fused_distillation_loss(**inputs, ea_granularity=gran, chunk_size=3, return_stats=True)
        assert loss.item() == 0.0
        assert stats["num_tokens"].item() == 0
        assert stats["ce_loss"].item() == 0.0 and stats["kd_loss"].item() == 0.0
        grads = torch.autograd.grad(loss, [inputs[k] for k in STUDENT_KEYS])
        for grad in grads:
            assert torch.isfinite(grad).all() and not grad.any()


def test_teacher_gets_no_grad_and_grad_output_scales():
    inputs = make_inputs(seed=14)
    loss = fused_distillation_loss(**inputs, chunk_size=4)
    (2.5 * loss).backward()
    assert inputs["teacher_hidden"].grad is None
    assert inputs["teacher_weight"].grad is None
    assert inputs["teacher_bias"].grad is None
    ref_grads = torch.autograd.grad(2.5 * reference_loss(**inputs), [inputs[k] for k in STUDENT_KEYS])
    for key, want in zip(STUDENT_KEYS, ref_grads):
        torch.testing.assert_close(inputs[key].grad, want, rtol=1e-4, atol=1e-5)


def test_frozen_lm_head_and_no_grad():
    """A frozen head (LoRA) gets no gradient, the hidden states still do; under no_grad only the value is computed."""
    inputs = make_inputs(seed=15)
    inputs["student_weight"] = inputs["student_weight"].detach()
    inputs["student_bias"] = inputs["student_bias"].detach()
    assert_matches_reference(inputs, ea_granularity="sequence", chunk_size=4)
    with torch.no_grad():
        loss = fused_distillation_loss(**inputs, ea_granularity="sequence", chunk_size=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_loss(**inputs, ea_granularity="sequence").detach())


def test_tied_embeddings():
    """The lm_head weight is also the input embedding: both gradient paths reach the same tensor."""
    inputs = make_inputs(seed=16, bias=False)
    embedding = inputs["student_weight"]
    ids = torch.randint(0, V_S, (B, T), generator=torch.Generator().manual_seed(0))

    def with_tied_hidden(fn, **kwargs):
        hidden = torch.tanh(embedding[ids]) * 2.0  # a stand-in backbone reading the same weight
        rest = {k: v for k, v in inputs.items() if k != "student_hidden"}
        loss = fn(student_hidden=hidden, **rest, **kwargs)
        return torch.autograd.grad(loss, embedding)[0]

    torch.testing.assert_close(
        with_tied_hidden(fused_distillation_loss, chunk_size=3), with_tied_hidden(reference_loss), rtol=1e-4, atol=1e-5
    )


def test_kd_ratio_zero_without_teacher():
    inputs = make_inputs(seed=17)
    inputs["teacher_hidden"] = inputs["teacher_weight"] = None
    del inputs["teacher_bias"]
    loss, stats = fused_distillation_loss(**inputs, kd_ratio=0.0, chunk_size=4, return_stats=True)
    ref = reference_loss(**inputs, kd_ratio=0.0)
    torch.testing.assert_close(loss, ref)
    n = (inputs["labels"] != -100).sum()
    torch.testing.assert_close(stats["ce_loss"], ref.detach())  # (1 - 0) * CE_sum / N, N = local count
    assert set(stats) == {"ce_loss", "num_tokens"} and stats["num_tokens"] == n


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("ea", [True, False])
def test_stats_match_reference(gran, ea):
    inputs = make_inputs(seed=18)
    kwargs = {"divergence": "fkl", "temperature": 2.0, "ea": ea, "ea_granularity": gran}
    loss, stats = fused_distillation_loss(**inputs, kd_ratio=0.5, chunk_size=3, return_stats=True, **kwargs)
    z_s = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
    z_t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    labels = inputs["labels"]
    kd, ref_stats = distillation_loss(z_s, z_t[..., :V_S], labels, return_stats=True, **kwargs)
    assert set(stats) == STATS_KEYS | {"ce_loss", "kd_loss"}
    for key in STATS_KEYS:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-5, atol=1e-6)
    n = (labels != -100).sum()
    ce = F.cross_entropy(z_s.reshape(-1, V_S), labels.reshape(-1), ignore_index=-100, reduction="sum") / n
    torch.testing.assert_close(stats["ce_loss"], ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["kd_loss"], kd.detach(), rtol=1e-5, atol=1e-6)  # N = local count here
    assert all(not v.requires_grad for v in stats.values())


# ----------------------------------------------------------------------------------------------------------------------
# Memory: no [N, V] tensor
# ----------------------------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (forward, in-forward autograd and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.numel:
                self.numel, self.op = leaf.numel(), func
        return out


@pytest.mark.parametrize("gran", GRANS)
def test_never_materialises_n_by_v(gran):
    b, t, h, v, chunk_size = 4, 64, 4, 97, 16
    g = torch.Generator().manual_seed(19)
    hs = torch.randn(b, t, h, generator=g).requires_grad_()
    w = torch.randn(v, h, generator=g).requires_grad_()
    ht = torch.randn(b, t, 6, generator=g)
    wt = torch.randn(v + 3, 6, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :8] = -100
    n = int((labels != -100).sum())
    assert n > 10 * chunk_size and n * max(h, 6) <= chunk_size * v and h <= chunk_size  # other tensors stay small
    kwargs = {"divergence": "jsd", "ea_granularity": gran, "kd_ratio": 0.5}
    with LargestTensor() as fused:
        loss = fused_distillation_loss(hs, w, ht, wt, labels, chunk_size=chunk_size, **kwargs)
        loss.backward()
    assert fused.numel <= chunk_size * v, (fused.numel, fused.op)
    # The instrument does see the reference's full logits.
    with LargestTensor() as ref:
        reference_loss(hs, w, ht, wt, labels, **kwargs).backward()
    assert ref.numel >= n * v


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"divergence": "kl"},
        {"ea_granularity": "batch"},
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"entropy_temperature": -1.0},
        {"divergence": "skl", "skew_alpha": 1.0},
        {"divergence": "srkl", "skew_alpha": 0.0},
        {"divergence": "jsd", "jsd_beta": 1.5},
    ],
)
def test_argument_errors_match_reference(bad):
    inputs = make_inputs(seed=20)
    with pytest.raises(ValueError) as ref_error:
        reference_loss(**inputs, **bad)
    with pytest.raises(ValueError) as fused_error:
        fused_distillation_loss(**inputs, **bad)
    assert str(fused_error.value) == str(ref_error.value)
    assert next(iter(bad)) in str(fused_error.value) or "divergence" in bad


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kd_ratio": 1.5}, "kd_ratio"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"student_softcap": 0.0}, "student_softcap"),
        ({"teacher_hidden": None}, "needs a teacher"),
        ({"labels": torch.zeros(B, T + 1, dtype=torch.long)}, "aligned with labels"),
        ({"teacher_hidden": torch.zeros(B, T + 1, H_T)}, "teacher_hidden must be .* aligned with labels"),
        ({"student_hidden": torch.zeros(B, T, H_S + 1)}, "hidden size"),
        ({"teacher_weight": torch.zeros(V_T, H_T + 1)}, "hidden size"),
        ({"student_bias": torch.zeros(V_S + 1)}, "student_bias"),
        ({"labels": torch.zeros(B * T, dtype=torch.long)}, r"labels must be \[B, T\]"),
    ],
)
def test_shape_and_value_errors(change, match):
    inputs = {**make_inputs(seed=21), **change}
    with pytest.raises(ValueError, match=match):
        fused_distillation_loss(**inputs)


def test_sharded_weights_raise():
    inputs = make_inputs(seed=22)
    # ZeRO-3 partitioned parameter outside GatheredParameters: an empty tensor
    with pytest.raises(ValueError, match="gather the full lm_head weight"):
        fused_distillation_loss(**{**inputs, "student_weight": torch.empty(0, requires_grad=True)})
    with pytest.raises(ValueError, match="teacher_weight .*ZeRO-3/FSDP shard"):
        fused_distillation_loss(**{**inputs, "teacher_weight": torch.empty(0)})
    # a DeepSpeed parameter whose local data is not its full shape
    shard = torch.zeros(5, H_S)
    shard.ds_id, shard.ds_shape = 0, (V_S, H_S)
    with pytest.raises(ValueError, match="ZeRO-3/FSDP shard"):
        fused_distillation_loss(**{**inputs, "student_weight": shard})


def test_dtensor_weight_raises(monkeypatch):
    import torch.distributed.tensor as dist_tensor

    class FakeDTensor(torch.Tensor):
        pass

    monkeypatch.setattr(dist_tensor, "DTensor", FakeDTensor)
    weight = torch.Tensor._make_subclass(FakeDTensor, torch.randn(V_S, H_S))
    with pytest.raises(ValueError, match="DTensor.*full_tensor"):
        fused_distillation_loss(**{**make_inputs(seed=23), "student_weight": weight})

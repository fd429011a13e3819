"""The offline teacher cache: encoding, the top-k + tail maths, exactness against the online teacher, resuming, and
the refusals (mismatched recipe, missing or corrupted shards, bad k)."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_helpers import hub_teacher_arriving_on_load
from loss_helpers import distillation_loss_kw as distillation_loss
from loss_helpers import fused_loss_kw as fused_distillation_loss

import eakd_llm.teacher.cache as cache_module
from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.loss.distillation import SparseTeacher, ea_weights, sparse_divergence
from eakd_llm.models.fingerprint import fingerprint_weights
from eakd_llm.teacher.cache import (
    CacheManifest,
    TeacherCache,
    build_cache,
    bytes_per_token,
    decode_id_stream,
    decode_ids,
    decode_values,
    encode_id_stream,
    encode_ids,
    encode_values,
    entry_counts,
    teacher_entries,
)
from eakd_llm.training.train import prepare_run
from eakd_llm.training.trainer import EAKDTrainer

REPO = Path(__file__).resolve().parents[1]
DIVS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd")


def _config(tiny_stack, tmp_path, **overrides) -> EAKDConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_stack["student"],
        teacher_model_name_or_path=tiny_stack["teacher"], dataset_name=tiny_stack["data_dir"],
        response_column="output", max_length=96, max_prompt_length=64, use_cpu=True, per_device_train_batch_size=8,
        max_steps=2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, max_train_samples=120,
        temperature=1.5, entropy_temperature=2.0,
    )
    values.update(overrides)
    return EAKDConfig(**values)


def _sparse(teacher_logits: torch.Tensor, k: int, tau: float, tau_e: float, mass: float | None = None,
            k_min: int = 1) -> SparseTeacher:
    e = teacher_entries(teacher_logits, k, tau, tau_e, mass, k_min)
    return SparseTeacher(e["ids"], e["log_probs"], e["log_tail"], e["entropy"])


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "vocab"), [(1, 2), (8, 1024), (128, 1024), (32, 151_936), (128, 151_936), (37, 37)])
def test_id_encoding_round_trips_and_its_size(k, vocab):
    g = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k].sort().values for _ in range(5)]).numpy()
    packed = encode_ids(ids, vocab)
    bitmap = vocab <= k * math.ceil(math.log2(vocab))
    assert packed.shape == (5, math.ceil(vocab / 8) if bitmap else math.ceil(k * math.ceil(math.log2(vocab)) / 8))
    np.testing.assert_array_equal(decode_ids(packed, k, vocab), ids)


def test_value_formats_round_trip_within_their_precision():
    values = torch.log_softmax(torch.randn(6, 1000) * 3, -1).topk(64).values
    for fmt, tolerance in (("float32", 0.0), ("float16", 2e-2), ("uint8", None)):
        decoded = decode_values(encode_values(values, fmt), fmt)
        step = ((values.max(-1).values - values.min(-1).values) / 255).unsqueeze(-1)
        bound = step / 2 + 1e-6 if tolerance is None else tolerance * values.abs().clamp(min=1)
        assert ((decoded - values).abs() <= bound).all(), fmt


@pytest.mark.parametrize("fmt", ["float32", "float16", "uint8"])
def test_a_masked_token_with_k_equal_to_v_stays_finite_in_every_format(fmt):
    """k = V keeps a -inf logit's log-probability: uint8 used to decode the whole row to NaN (infinite step). Every
    format must decode to values the divergence handles, giving the online loss within the format's precision."""
    logits = torch.tensor([[3.0, 1.0, 0.0, float("-inf")], [0.5, -1.0, 2.0, 1.0]])
    entries = teacher_entries(logits, k=4, temperature=1.0, entropy_temperature=2.0)
    decoded = decode_values(encode_values(entries["log_probs"], fmt), fmt)
    assert not decoded.isnan().any() and not (decoded == float("inf")).any()
    sparse = SparseTeacher(entries["ids"], decoded, entries["log_tail"], entries["entropy"])
    assert not sparse.has_nonfinite()
    student = torch.tensor([[0.2, 0.1, -0.3, 0.4], [1.0, 0.0, -1.0, 0.5]])
    got = sparse_divergence(torch.log_softmax(student, -1), sparse, "fkl")
    p = torch.softmax(logits, -1)
    log_ratio = torch.log_softmax(logits, -1) - torch.log_softmax(student, -1)
    want = torch.where(p > 0, p * log_ratio, torch.zeros_like(p)).sum(-1)  # 0 * log 0 = 0
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 if fmt == "uint8" else 1e-3)


def test_nonfinite_cached_values_are_named_by_both_loss_paths():
    """A NaN in a cached entry (a corrupt or badly built cache) is caught before it trains: the full-logits path checks
    the entries first, the fused path names the cache when its loss is not finite."""
    from eakd_llm.loss.distillation import LossSettings
    from eakd_llm.training.loss_paths import full_logits_loss, fused_head_loss

    torch.manual_seed(0)
    labels = torch.tensor([[-100, 1, 2, 3]])
    entries = teacher_entries(torch.randn(3, 8), k=4, temperature=1.0, entropy_temperature=2.0)
    entries["log_probs"][1, 0] = float("nan")
    sparse = SparseTeacher(entries["ids"], entries["log_probs"], entries["log_tail"], entries["entropy"])
    settings, n = LossSettings(), torch.tensor(3.0)
    loss, _, bad = full_logits_loss(torch.randn(1, 4, 8), sparse, labels, settings, n, 8)
    assert loss is None and bad == ["cached teacher"]
    head = torch.nn.Linear(6, 8, bias=False)
    model = type("Tiny", (torch.nn.Module,), {"get_output_embeddings": lambda self: head, "config": None})()
    model.config = type("Config", (), {})()
    loss, _, bad = fused_head_loss(model, torch.randn(1, 4, 6), sparse, labels, settings, n, 8)
    assert not torch.isfinite(loss) and bad == ["cached teacher"]


def test_bytes_per_token_arithmetic():
    # demo vocabulary (1024): k=128 ids as a 1024-bit bitmap (128 B) beat 128 x 10 bits (160 B)
    assert bytes_per_token(128, 1024, "uint8") == 128 + (128 + 8) + 8
    assert bytes_per_token(32, 1024, "float16") == 40 + 64 + 8
    # Qwen2.5 (151,936): 18 bits an id
    assert bytes_per_token(128, 151_936, "uint8") == 288 + 136 + 8
    assert bytes_per_token(32, 151_936, "float32") == 72 + 128 + 8


# ----------------------------------------------------------------------------------------------------------------------
# Top-k + tail maths
# ----------------------------------------------------------------------------------------------------------------------


def _np_bucket_divergence(s_logits, t_logits, ids, tau, name):
    """Independent float64 reference: merge every token outside ``ids`` into one bucket, then the divergence."""
    def softmax(x):
        z = np.asarray(x, dtype=np.float64) / tau
        z -= z.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    out = []
    for row in range(s_logits.shape[0]):
        ps, pt = softmax(s_logits[row]), softmax(t_logits[row])
        top = ids[row]
        rest = np.setdiff1d(np.arange(ps.shape[0]), top)
        q = np.append(ps[top], ps[rest].sum()) if len(rest) else ps[top]
        p = np.append(pt[top], pt[rest].sum()) if len(rest) else pt[top]

        def kl(a, b):
            return float(np.sum(np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)))

        if name == "fkl":
            out.append(kl(p, q))
        elif name == "rkl":
            out.append(kl(q, p))
        elif name == "skl":
            out.append(kl(p, 0.1 * p + 0.9 * q))
        elif name == "srkl":
            out.append(kl(q, 0.9 * p + 0.1 * q))
        elif name == "jsd":
            m = 0.5 * p + 0.5 * q
            out.append(0.5 * kl(p, m) + 0.5 * kl(q, m))
        else:
            out.append(0.5 * float(np.abs(p - q).sum()))
    return np.array(out)


@pytest.mark.parametrize("div", DIVS)
def test_tail_bucket_divergence_matches_a_float64_reference_and_never_exceeds_the_full_one(div):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(7, 53, generator=g) * 3, torch.randn(7, 53, generator=g) * 3
    for k in (1, 5, 52):
        sparse = _sparse(t, k, 1.5, 2.0)
        got = sparse_divergence(torch.log_softmax(s / 1.5, -1), sparse, div)
        ref = _np_bucket_divergence(s.numpy(), t.numpy(), sparse.ids.numpy(), 1.5, div)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-6)
        full = _np_bucket_divergence(s.numpy(), t.numpy(), np.tile(np.arange(53), (7, 1)), 1.5, div)
        assert (got.numpy() <= full + 1e-5).all()  # data processing: merging tokens never adds divergence


def test_entry_counts_keep_the_fewest_entries_reaching_the_mass():
    top = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]]).log()
    assert entry_counts(top, 0.7, 1).tolist() == [2, 1, 3]
    assert entry_counts(top, 0.9, 1).tolist() == [3, 1, 4]
    assert entry_counts(top, 0.9, 2).tolist() == [3, 2, 4]  # the floor
    assert entry_counts(top[:, :2], 0.9, 1).tolist() == [2, 1, 2]  # the ceiling (k)


@pytest.mark.parametrize("bits_vocab", [2, 37, 512, 151_936])
def test_an_id_stream_reads_back_any_range(bits_vocab):
    ids = np.random.default_rng(bits_vocab).integers(0, bits_vocab, 61)
    stream = encode_id_stream(ids, bits_vocab)
    assert stream.nbytes == math.ceil(61 * max(1, math.ceil(math.log2(bits_vocab))) / 8)
    for first in range(0, 61, 5):
        for count in {0, 1, min(7, 61 - first), 61 - first}:
            np.testing.assert_array_equal(decode_id_stream(stream, first, count, bits_vocab), ids[first:first + count])


def _adaptive_reference(logits: torch.Tensor, tau: float, mass: float, k_min: int, k: int):
    """Per row, by hand in float64: the ids kept (the fewest most probable reaching ``mass``, in [k_min, k]) and the
    log of the mass left outside them."""
    p = torch.softmax(logits.double() / tau, -1).numpy()
    rows = []
    for row in p:
        order = np.argsort(-row, kind="stable")
        count = int(np.clip(np.searchsorted(np.cumsum(row[order]), mass) + 1, k_min, k))
        kept = np.sort(order[:count])
        rows.append((kept, math.log(1.0 - row[kept].sum())))
    return rows


def test_adaptive_entries_keep_each_rows_top_mass_and_put_the_rest_in_the_tail():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(40, 97, generator=g) * torch.linspace(0.5, 6, 40).unsqueeze(-1)  # flat to peaked rows
    entries = teacher_entries(t, 32, 1.5, 2.0, mass=0.8, k_min=2)
    fixed = teacher_entries(t, 32, 1.5, 2.0)
    counts = (entries["ids"] >= 0).sum(-1)
    assert counts.min() >= 2 and counts.max() == 32 and len(set(counts.tolist())) > 5  # it adapts
    for row, (kept, log_tail) in enumerate(_adaptive_reference(t, 1.5, 0.8, 2, 32)):
        n = len(kept)
        np.testing.assert_array_equal(entries["ids"][row, :n].numpy(), kept)  # ascending, then the empty slots
        assert (entries["ids"][row, n:] == -1).all() and (entries["log_probs"][row, n:] == float("-inf")).all()
        full = torch.log_softmax(t[row].double() / 1.5, -1)
        torch.testing.assert_close(entries["log_probs"][row, :n].double(), full[kept], rtol=0, atol=1e-5)
        assert entries["log_tail"][row].item() == pytest.approx(log_tail, abs=1e-4)
    torch.testing.assert_close(entries["entropy"], fixed["entropy"])  # H_T stays exact


@pytest.mark.parametrize("div", DIVS)
def test_empty_slots_give_each_rows_own_top_k_divergence_and_gradient(div):
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(12, 53, generator=g) * 3).requires_grad_()
    t = torch.randn(12, 53, generator=g) * torch.linspace(0.5, 5, 12).unsqueeze(-1)
    sparse = _sparse(t, 24, 1.5, 2.0, mass=0.7, k_min=1)
    got = sparse_divergence(torch.log_softmax(s / 1.5, -1), sparse, div)
    kept = [row[row >= 0] for row in sparse.ids.numpy()]
    ref = _np_bucket_divergence(s.detach().numpy(), t.numpy(), kept, 1.5, div)
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4, atol=1e-6)
    # the gradient equals that of each row taken alone with its own k (no empty slots)
    rows = [sparse_divergence(torch.log_softmax(s[i:i + 1] / 1.5, -1), _sparse(t[i:i + 1], len(kept[i]), 1.5, 2.0),
                              div) for i in range(12)]
    grad = torch.autograd.grad(got.sum(), s)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(torch.cat(rows).sum(), s)[0], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(grad).all()


def _make_batch(seed: int = 0, b: int = 3, t: int = 9, v: int = 41):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, v, generator=g) * 2).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    return s, teacher, labels


@pytest.mark.parametrize(("div", "gran"), list(itertools.product(DIVS, ("token", "sequence"))))
def test_k_equal_to_vocabulary_gives_the_online_loss_and_gradients(div, gran):
    s, t, labels = _make_batch()
    mask = labels != -100
    sparse = _sparse(t[mask], t.shape[-1], 1.5, 2.0)
    kw = dict(divergence=div, temperature=1.5, entropy_temperature=2.0, ea_granularity=gran)
    online = distillation_loss(s, t, labels, **kw)
    cached = distillation_loss(s, sparse, labels, **kw)
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(cached, s)[0], torch.autograd.grad(online, s)[0], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 20])
def test_ea_weights_from_a_top_k_cache_are_the_online_ones(k):
    s, t, labels = _make_batch(seed=2)
    mask = labels != -100
    sparse = _sparse(t[mask], k, 1.0, 2.0)
    for gran in ("token", "sequence"):
        _, online = distillation_loss(s, t, labels, ea_granularity=gran, return_stats=True)
        _, cached = distillation_loss(s, sparse, labels, ea_granularity=gran, return_stats=True)
        for key in ("teacher_entropy", "student_entropy", "ea_weight_mean", "ea_weight_min", "ea_weight_max"):
            torch.testing.assert_close(cached[key], online[key], rtol=1e-6, atol=1e-6)
    w = ea_weights(s, t, labels, 2.0, "token")[mask]
    torch.testing.assert_close(sparse.entropy, torch.special.entr(torch.softmax(t[mask] / 2.0, -1)).sum(-1))
    assert w.shape == sparse.entropy.shape


@pytest.mark.parametrize(("kd_ratio", "gran", "k", "mass"), [(0.5, "token", 41, None), (1.0, "sequence", 41, None),
                                                        (0.3, "token", 6, None), (0.6, "token", 20, 0.5),
                                                        (1.0, "sequence", 20, 0.5)])
def test_fused_path_with_a_cache_matches_the_full_logits_path(kd_ratio, gran, k, mass):
    g = torch.Generator().manual_seed(5)
    hs = (torch.randn(3, 9, 8, generator=g)).requires_grad_()
    w = (torch.randn(41, 8, generator=g)).requires_grad_()
    t_logits = torch.randn(3, 9, 41, generator=g) * 2
    labels = torch.randint(0, 41, (3, 9), generator=g)
    labels[1, :4] = -100
    mask = labels != -100
    sparse = _sparse(t_logits[mask], k, 1.0, 2.0, mass)
    if mass is not None:
        assert (sparse.ids < 0).any()  # rows with empty slots
    kw = dict(kd_ratio=kd_ratio, ea_granularity=gran, entropy_temperature=2.0)
    fused = fused_distillation_loss(hs, w, None, None, labels, teacher_sparse=sparse, chunk_size=4, **kw)
    z = hs @ w.T
    ce = torch.nn.functional.cross_entropy(z[mask], labels[mask], reduction="sum") / mask.sum()
    ref = (1 - kd_ratio) * ce + kd_ratio * distillation_loss(z, sparse, labels, ea_granularity=gran,
                                                             entropy_temperature=2.0)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, [hs, w]), torch.autograd.grad(ref, [hs, w])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mass", [None, 0.5])
def test_compiled_chunk_maths_with_a_cache_matches_eager(monkeypatch, mass):
    """compile=True with a cached teacher (fixed k, and empty slots of an adaptive k): the compiled graph gives the
    eager loss and gradients, and compiling did not fail over to eager."""
    import eakd_llm.loss.chunked as chunked

    monkeypatch.setattr(chunked, "_COMPILE_FAILURE", None)
    g = torch.Generator().manual_seed(6)
    hs, w = torch.randn(3, 9, 8, generator=g), torch.randn(41, 8, generator=g)
    labels = torch.randint(0, 41, (3, 9), generator=g)
    labels[1, :4] = -100
    sparse = _sparse((torch.randn(3, 9, 41, generator=g) * 2)[labels != -100], 20, 1.0, 2.0, mass)
    results = []
    for compile_ in (False, True):
        h, wt = hs.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_distillation_loss(h, wt, None, None, labels, teacher_sparse=sparse, chunk_size=4, kd_ratio=0.5,
                                       divergence="jsd", entropy_temperature=2.0, compile=compile_)
        results.append((loss, *torch.autograd.grad(loss, [h, wt])))
    assert chunked._COMPILE_FAILURE is None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Building, resuming, training from a cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_cache(tiny_stack, tmp_path_factory):
    """A k = V, float32 cache of 120 training examples (exact) and its config."""
    folder = tmp_path_factory.mktemp("cache") / "full"
    config = _config(tiny_stack, folder.parent)
    vocab = json.load(open(Path(tiny_stack["teacher"]) / "config.json"))["vocab_size"]
    build_cache(config, str(folder), top_k=vocab, value_format="float32", shard_size=50, show_progress=False)
    return str(folder)


@pytest.mark.parametrize("fused", [True, False])
def test_training_from_a_full_cache_equals_the_online_teacher(tiny_stack, tmp_path, full_cache, fused):
    online = EAKDTrainer(args=_config(tiny_stack, tmp_path, fused_loss=fused),
                         **prepare_run(_config(tiny_stack, tmp_path, fused_loss=fused)))
    config = _config(tiny_stack, tmp_path, fused_loss=fused, teacher_cache=full_cache,
                     teacher_model_name_or_path=None)
    parts = prepare_run(config)
    assert parts["teacher_model"] is None  # no teacher in memory
    cached = EAKDTrainer(args=config, **parts)
    features = [online.train_dataset[i] for i in range(8)]
    params = [p for p in online.model.parameters()]
    for a, b in zip(params, cached.model.parameters()):
        assert torch.equal(a, b)
    loss_online = online.compute_loss(online.model, online.data_collator(features))
    loss_cached = cached.compute_loss(cached.model, cached.data_collator(features))
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss_cached, list(cached.model.parameters())),
                         torch.autograd.grad(loss_online, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_an_interrupted_build_resumes_to_the_same_cache(tiny_stack, tmp_path, monkeypatch):
    config = _config(tiny_stack, tmp_path, max_train_samples=60)
    build_cache(config, str(tmp_path / "straight"), top_k=8, value_format="uint8", shard_size=25, show_progress=False)

    original, written = cache_module.write_shard, []

    def write_then_die(path, *args):
        original(path, *args)
        written.append(path)
        if len(written) == 1:
            raise KeyboardInterrupt  # killed after the first shard
    monkeypatch.setattr(cache_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, str(tmp_path / "resumed"), top_k=8, value_format="uint8", shard_size=25,
                    show_progress=False)
    assert not CacheManifest.read(str(tmp_path / "resumed")).splits["train"]["complete"]
    with pytest.raises(ConfigError, match="its build did not finish"):
        prepare_run(_config(tiny_stack, tmp_path, max_train_samples=60, teacher_cache=str(tmp_path / "resumed")))
    (tmp_path / "resumed" / "train-00001.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    monkeypatch.setattr(cache_module, "write_shard", original)
    written.clear()
    manifest = build_cache(config, str(tmp_path / "resumed"), top_k=8, value_format="uint8", shard_size=25,
                           show_progress=False)
    assert manifest.splits["train"]["complete"]
    straight, resumed = TeacherCache(str(tmp_path / "straight")), TeacherCache(str(tmp_path / "resumed"))
    assert straight.index.keys() == resumed.index.keys()
    for name in manifest.splits["train"]["shards"]:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_mismatched_missing_or_corrupted_caches_are_refused(tiny_stack, tmp_path, full_cache):
    def run(**overrides):
        return prepare_run(_config(tiny_stack, tmp_path, teacher_cache=full_cache, **overrides))

    with pytest.raises(ConfigError, match="entropy_temperature: cache 2.0, recipe 3.0"):
        run(entropy_temperature=3.0)
    with pytest.raises(ConfigError, match="temperature: cache 1.5, recipe 1.0"):
        run(temperature=1.0)
    with pytest.raises(ConfigError, match="tokenized data differs"):
        run(max_train_samples=100)
    with pytest.raises(ConfigError, match="teacher weights: the cache was built from other weights than"):
        run(teacher_model_name_or_path=tiny_stack["student"])  # another teacher: bound by its weights, not its path
    with pytest.raises(ConfigError, match="has no manifest.json"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_cache=str(tmp_path)))
    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(full_cache, other_tokenizer)
    manifest = json.loads((other_tokenizer / "manifest.json").read_text())
    manifest["tokenizer"] = "0" * 32  # the fingerprint of another tokenizer's vocabulary and special tokens
    (other_tokenizer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="special tokens differ\\): built with another tokenizer"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_cache=str(other_tokenizer)))
    broken = tmp_path / "broken"
    shutil.copytree(full_cache, broken)
    (broken / "train-00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="shard .*train-00001.safetensors is corrupted"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_cache=str(broken)))
    os.remove(broken / "train-00001.safetensors")
    with pytest.raises(ConfigError, match="shard train-00001.safetensors of split 'train' is missing"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_cache=str(broken)))


def test_the_cache_is_bound_to_the_teacher_weights_not_its_path(tiny_stack, tmp_path, monkeypatch):
    """A teacher retrained into the same folder is refused (by training and by a resumed build), naming the teacher;
    another dtype is refused; a relative spelling of the same folder is the same teacher."""
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_stack["teacher"], teacher)
    config = _config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16)
    cache = str(tmp_path / "cache")
    build_cache(config, cache, top_k=8, value_format="float16", shard_size=8, show_progress=False)
    assert CacheManifest.read(cache).teacher_fingerprint == fingerprint_weights(str(teacher)).digest

    moved = tmp_path / "moved" / "teacher"  # the same weights elsewhere (other path, other mtimes): accepted
    moved.parent.mkdir()
    shutil.copytree(teacher, moved)
    prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(moved), max_train_samples=16,
                        teacher_cache=cache))

    monkeypatch.chdir(tmp_path)  # the same folder spelled relative: accepted
    prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path="./teacher", max_train_samples=16,
                        teacher_cache=cache))
    with pytest.raises(ConfigError, match="teacher_dtype: cache 'auto', recipe 'bfloat16'"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16,
                            teacher_cache=cache, teacher_dtype="bfloat16"))

    retrained = AutoModelForCausalLM.from_pretrained(str(teacher))
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.01)
    retrained.save_pretrained(str(teacher))  # same folder, same shapes, same safetensors header: other weights
    with pytest.raises(ConfigError, match="teacher weights: the cache was built from other weights than .*teacher"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16,
                            teacher_cache=cache))
    with pytest.raises(ConfigError, match="built with other settings \\(teacher_fingerprint\\)"):
        build_cache(config, cache, top_k=8, value_format="float16", shard_size=8, show_progress=False)


def _norm_value_offsets(path: Path) -> list[int]:
    """Byte offsets of every float32 value of the norm weights in a safetensors file (8-byte header length, JSON
    header, data)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    spans = [entry["data_offsets"] for name, entry in header.items() if name.endswith("norm.weight")]
    return [8 + length + o for start, end in sorted(spans) for o in range(start, end, 4)]


def test_one_changed_weight_anywhere_refuses_the_cache(tiny_stack, tmp_path):
    """One value of a norm weight edited in place (as bias- or norm-only tuning saved into the same folder would):
    same size, same header, a few changed bytes in a file larger than the 64 blocks of 64 KiB a sampled hash reads,
    at an offset between those blocks. Every byte is hashed, so the cache is refused, naming the changed file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    config = AutoConfig.from_pretrained(tiny_stack["teacher"])
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(teacher))  # a wider teacher: a bigger file
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(tiny_stack["teacher"], name)):
            shutil.copy(os.path.join(tiny_stack["teacher"], name), teacher / name)
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    assert size > 64 * 65536
    sampled = [(i * (size - 65536) // 63, i * (size - 65536) // 63 + 65536) for i in range(64)]
    offset = next(o for o in _norm_value_offsets(weights)
                  if not any(a - 4 < o < b for a, b in sampled))  # the first norm value no sampled block reads
    run = _config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16)
    cache = str(tmp_path / "cache")
    build_cache(run, cache, top_k=8, value_format="float16", shard_size=8, show_progress=False)
    prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16,
                        teacher_cache=cache))
    with open(weights, "r+b") as handle:
        handle.seek(offset)
        value = np.frombuffer(handle.read(4), dtype=np.float32)[0]
        handle.seek(offset)
        handle.write(np.float32(value + 0.5).tobytes())
    assert weights.stat().st_size == size
    with pytest.raises(ConfigError, match="other weights than .*changed: model.safetensors"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=str(teacher), max_train_samples=16,
                            teacher_cache=cache))


def test_a_hub_teachers_first_cache_records_its_weights(tiny_stack, tmp_path, monkeypatch):
    """A hub id whose weights are not downloaded yet: the build fingerprints them after loading (downloading) the
    teacher, so training from that cache is accepted (it used to record no fingerprint, and every later run refused
    the cache as built from other weights)."""
    repo = hub_teacher_arriving_on_load(monkeypatch, tiny_stack["teacher"], tmp_path / "hub")
    config = _config(tiny_stack, tmp_path, teacher_model_name_or_path=repo, max_train_samples=16)
    cache = str(tmp_path / "cache")
    manifest = build_cache(config, cache, top_k=8, value_format="float16", shard_size=8, show_progress=False)
    assert manifest.teacher_fingerprint == fingerprint_weights(tiny_stack["teacher"]).digest
    prepare_run(_config(tiny_stack, tmp_path, teacher_model_name_or_path=repo, max_train_samples=16,
                        teacher_cache=cache))


def test_bad_k_and_a_folder_holding_another_cache(tiny_stack, tmp_path, full_cache):
    config = _config(tiny_stack, tmp_path)
    for k in (0, 10**6):
        with pytest.raises(ConfigError, match="--top-k must be in \\[1, V\\]"):
            build_cache(config, str(tmp_path / "c"), top_k=k)
    before = sorted(os.listdir(full_cache))
    stamps = [os.path.getmtime(os.path.join(full_cache, name)) for name in before]
    with pytest.raises(ConfigError, match="already holds a teacher cache built with other settings .*top_k"):
        build_cache(config, full_cache, top_k=4)
    assert sorted(os.listdir(full_cache)) == before  # nothing overwritten
    assert [os.path.getmtime(os.path.join(full_cache, name)) for name in before] == stamps


def _shard_bytes(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@pytest.mark.parametrize("fmt", ["float32", "uint8"])
def test_an_adaptive_cache_stores_each_tokens_top_mass_and_reads_back_the_exact_entries(tiny_stack, tmp_path, fmt):
    # tau = 0.1: the tiny random teacher is near uniform at tau = 1, sharp enough here for the counts to vary
    config = _config(tiny_stack, tmp_path, temperature=0.1, max_train_samples=40)
    reference, folder, fixed = (str(tmp_path / name) for name in ("exact", "adaptive", "fixed"))
    build_cache(config, reference, top_k=512, value_format="float32", shard_size=50, show_progress=False)
    manifest = build_cache(config, folder, top_k=64, value_format=fmt, shard_size=16, show_progress=False,
                           top_k_mass=0.6, top_k_min=2)
    build_cache(config, fixed, top_k=64, value_format=fmt, shard_size=16, show_progress=False)
    assert (manifest.top_k_mass, manifest.top_k_min) == (0.6, 2)
    exact, adaptive = TeacherCache(reference), TeacherCache(folder)
    assert adaptive.index.keys() == exact.index.keys()
    counts = []
    for example in prepare_run(config)["train_dataset"]:
        # the k = V float32 cache holds every token's whole log-distribution at tau: the independent reference
        log_p = exact.entries(example["input_ids"], example["labels"]).log_probs.double()
        got = adaptive.entries(example["input_ids"], example["labels"])
        for row in range(log_p.shape[0]):
            order = torch.argsort(log_p[row], descending=True, stable=True)
            reach = int((log_p[row][order].exp().cumsum(0) < 0.6).sum()) + 1
            kept = order[:min(max(reach, 2), 64)].sort().values
            n = len(kept)
            counts.append(n)
            assert got.ids[row, :n].tolist() == kept.tolist() and (got.ids[row, n:] == -1).all()
            atol = 1e-5 if fmt == "float32" else 0.2  # uint8: a 255-step quantisation of each row's range
            torch.testing.assert_close(got.log_probs[row, :n].double(), log_p[row, kept], rtol=0, atol=atol)
            assert (got.log_probs[row, n:] == float("-inf")).all()
            rest = log_p[row].exp().sum() - log_p[row, kept].exp().sum()
            assert got.log_tail[row].item() == pytest.approx(math.log(rest), abs=1e-4)
    assert len(set(counts)) > 5 and min(counts) >= 2  # the teacher is sure of some tokens and not of others
    entries = manifest.splits["train"]["entries"]
    assert entries == sum(counts) < 64 * manifest.splits["train"]["tokens"]
    assert _shard_bytes(folder) < _shard_bytes(fixed)
    assert manifest.splits["train"]["bytes_per_token"] < bytes_per_token(64, manifest.vocab_size, fmt)


def test_training_from_an_adaptive_cache_fused_and_unfused_agree(tiny_stack, tmp_path):
    folder = str(tmp_path / "adaptive")
    build_cache(_config(tiny_stack, tmp_path, temperature=0.1), folder, top_k=48, value_format="float16",
                shard_size=50, show_progress=False, top_k_mass=0.5)
    losses, grads = [], []
    for fused in (True, False):
        config = _config(tiny_stack, tmp_path, temperature=0.1, fused_loss=fused, teacher_cache=folder,
                         teacher_model_name_or_path=None)
        trainer = EAKDTrainer(args=config, **prepare_run(config))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        assert (batch["teacher_ids"] < 0).any()  # rows with empty slots reach the loss
        losses.append(trainer.compute_loss(trainer.model, batch))
        grads.append(torch.autograd.grad(losses[-1], list(trainer.model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_adaptive_settings_and_a_resume_with_another_mass_are_refused(tiny_stack, tmp_path):
    config = _config(tiny_stack, tmp_path, max_train_samples=16)
    out = str(tmp_path / "c")
    cases = [(dict(top_k=8, top_k_mass=0.0), "--top-k-mass must be in \\(0, 1\\]"),
             (dict(top_k=8, top_k_mass=1.5), "--top-k-mass must be in"),
             (dict(top_k=512, top_k_mass=0.9), "--top-k-mass needs --top-k \\(its ceiling\\) below V = 512"),
             (dict(top_k=8, top_k_mass=0.9, top_k_min=9), "--top-k-min must be in \\[1, --top-k\\] = \\[1, 8\\]"),
             (dict(top_k=8, top_k_min=2), "--top-k-min is the floor of an entropy-adaptive k")]
    cases.append((dict(top_k=8, top_k_mass=0.9, top_k_min=0), "--top-k-min must be in \\[1, --top-k\\]"))
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_cache(config, out, show_progress=False, **kwargs)
    assert not os.path.exists(out)
    build_cache(config, out, top_k=8, top_k_mass=0.9, shard_size=8, show_progress=False)
    with pytest.raises(ConfigError, match="other settings \\(top_k_mass\\)"):
        build_cache(config, out, top_k=8, top_k_mass=0.8, shard_size=8, show_progress=False)
    with pytest.raises(ConfigError, match="other settings \\(top_k_mass, top_k_min\\)"):
        build_cache(config, out, top_k=8, shard_size=8, show_progress=False)


@pytest.mark.slow
def test_cache_teacher_command_then_training_from_the_cache(tiny_stack, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    recipe = str(REPO / "recipes" / "tiny" / "eakd_token.yaml")
    common = ["--model_name_or_path", tiny_stack["student"], "--dataset_name", tiny_stack["data_dir"],
              "--max_train_samples", "64", "--max_length", "96", "--max_prompt_length", "64",
              "--dataset_eval_split", "validation", "--max_eval_samples", "16", "--eval_strategy", "no"]
    build = subprocess.run(
        [sys.executable, "-m", "eakd_llm.cli", "cache-teacher", recipe, "--teacher_model_name_or_path",
         tiny_stack["teacher"], *common, "--output", str(tmp_path / "cache"), "--top-k", "16"],
        env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "B/token" in build.stdout and "teacher cache complete" in build.stdout
    manifest = CacheManifest.read(str(tmp_path / "cache"))
    assert set(manifest.splits) == {"train", "validation"} and manifest.top_k == 16
    train = subprocess.run(
        [sys.executable, "-m", "eakd_llm.cli", "train", recipe, *common, "--teacher_cache", str(tmp_path / "cache"),
         "--teacher_model_name_or_path", tiny_stack["teacher"], "--output_dir", str(tmp_path / "out"),
         "--max_steps", "2", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true"],
        env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "teacher: none loaded; top-16 cache" in train.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "eakd_llm.cli", "cache-teacher", recipe, "--teacher_model_name_or_path",
         tiny_stack["teacher"], *common, "--output", str(tmp_path / "cache"), "--top-k", "0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("eakd-llm: error: --top-k must be in [1, V]")
    assert "Traceback" not in bad.stderr
    adaptive = subprocess.run(
        [sys.executable, "-m", "eakd_llm.cli", "cache-teacher", recipe, "--teacher_model_name_or_path",
         tiny_stack["teacher"], *common, "--temperature", "0.1", "--output", str(tmp_path / "adaptive"),
         "--top-k", "32", "--top-k-mass", "0.5", "--top-k-min", "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert adaptive.returncode == 0, adaptive.stderr[-3000:]
    assert "adaptive k in [2, 32] to mass 0.5" in adaptive.stdout and "entries per token on average" in adaptive.stdout
    manifest = CacheManifest.read(str(tmp_path / "adaptive"))
    assert (manifest.top_k, manifest.top_k_mass, manifest.top_k_min) == (32, 0.5, 2)
    assert 2 <= manifest.splits["train"]["entries"] / manifest.splits["train"]["tokens"] < 32
    no_mass = subprocess.run(
        [sys.executable, "-m", "eakd_llm.cli", "cache-teacher", recipe, "--teacher_model_name_or_path",
         tiny_stack["teacher"], *common, "--output", str(tmp_path / "c2"), "--top-k", "8", "--top-k-min", "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert no_mass.returncode == 2 and "--top-k-min is the floor of an entropy-adaptive k" in no_mass.stderr


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/train-00000.safetensors", ".."])
def test_a_manifest_naming_a_shard_outside_the_cache_is_refused(tiny_stack, tmp_path, full_cache, name):
    damaged = tmp_path / "damaged"
    shutil.copytree(full_cache, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0] = name
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "outside.safetensors").write_bytes((Path(full_cache) / "train-00000.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="not a file name inside the cache folder"):
        TeacherCache(str(damaged))
    with pytest.raises(ConfigError, match="not a file name inside the cache folder"):
        prepare_run(_config(tiny_stack, tmp_path, teacher_cache=str(damaged)))

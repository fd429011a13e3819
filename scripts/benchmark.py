#!/usr/bin/env python
"""Benchmark one distillation training step: full-logits vs fused chunked EA-KD vs peers (TRL, Liger).

Every case runs on the same randomly initialised models (Llama/Qwen2-shaped configs, no hub access) and the same batch
(random tokens, the first quarter of each sequence is prompt: label -100), and measures one training step (teacher
forward without grad + student forward + loss + backward; no optimizer step):

* step time: median of ``--steps`` timed steps after ``--warmup`` untimed ones, and tokens/s = B * T / median;
* peak memory of the steps (the window opens after the warm-up step(s), with the gradients freed): CUDA:
  ``torch.cuda.max_memory_allocated()`` minus the memory allocated when the window opens, all cases in one process.
  CPU: each case is run again in a fresh subprocess (same seeds, so the same models and batch; one warm-up step, one
  measured step) that resets its peak resident set (``VmHWM``, by writing ``5`` to ``/proc/self/clear_refs``) when
  the window opens and reports ``VmHWM - VmRSS``.
  The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc maps every tensor-sized block and unmaps it
  when freed: the resident set then follows the live memory instead of keeping freed heap blocks, and one case's
  leftovers cannot hide (or inflate) another's peak.

Cases (``kd_ratio`` 0.5 unless noted; ``loss`` is the value of the step's loss, identical for the same maths):

* ``floor``: teacher backbone forward (hidden states only) + student SFT step with the model's own CE loss;
* ``full/<div>/<ea>``: ``EAKDTrainer.compute_loss`` today: full logits of both models, CE + ``distillation_loss``;
* ``fused/<div>/<ea>``: backbones only (last hidden states) + :func:`eakd_llm.loss.chunked.fused_distillation_loss`;
* ``fused-compiled/...``: the same with ``compile=True`` (``torch.compile`` of the per-chunk maths); ``.../c256``: chunk
  size 256 instead of the preset's;
* ``fused/<fkl|jsd>/no-ea/kd-only``: the fused path with ``kd_ratio=1``, no EA: the same loss as the peers;
* ``trl-gkd/<div>``: TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits (pure KD; beta 0 = forward KL, 0.5);
* ``trl-distill-chunked/<div>``: TRL's ``DistillationTrainer`` chunked divergence (same betas, pure KD);
* ``liger/<div>``: Liger's ``LigerFusedLinearJSDLoss`` (same betas, pure KD; needs triton/CUDA).

A peer that cannot be imported is reported as ``not importable: <reason>``; a case that runs out of memory as ``OOM``.

Usage::

    python scripts/benchmark.py --preset cpu-small          # a few minutes on a laptop CPU
    python scripts/benchmark.py --preset qwen-1.5b-0.5b     # one GPU (bf16, 4x1024 and 8x2048)

Results: ``benchmarks/results/<preset>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------------------------------
# Presets and cases
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = True


@dataclass
class Preset:
    name: str
    arch: str  # "llama" | "qwen2"
    device: str  # "cpu" | "cuda"
    dtype: str
    vocab_size: int
    teacher: ModelShape
    student: ModelShape
    shapes: list[tuple[int, int]]  # (batch, sequence length)
    chunk_size: int
    gradient_checkpointing: bool = False
    prompt_fraction: float = 0.25
    notes: str = ""


PRESETS = {
    "cpu-small": Preset(
        name="cpu-small",
        arch="llama",
        device="cpu",
        dtype="float32",
        vocab_size=32_000,
        teacher=ModelShape(256, 512, 2, 4, 2),
        student=ModelShape(128, 256, 2, 4, 2),
        shapes=[(4, 256)],
        chunk_size=128,
        notes="Tiny backbones and a 32k vocabulary: the step is dominated by the vocabulary projections and softmaxes",
    ),
    "qwen-1.5b-0.5b": Preset(
        name="qwen-1.5b-0.5b",
        arch="qwen2",
        device="cuda",
        dtype="bfloat16",
        vocab_size=151_936,
        teacher=ModelShape(1536, 8960, 28, 12, 2),  # Qwen2.5-1.5B
        student=ModelShape(896, 4864, 24, 14, 2),  # Qwen2.5-0.5B
        shapes=[(4, 1024), (8, 2048)],
        chunk_size=1024,
        gradient_checkpointing=True,
        notes="Qwen2.5-1.5B-shaped teacher -> 0.5B-shaped student, random weights, student gradient checkpointing",
    ),
}


@dataclass
class Case:
    name: str
    kind: str  # floor | full | fused | trl-gkd | trl-chunked | liger
    divergence: str = "fkl"
    ea: bool = True
    granularity: str = "token"
    kd_ratio: float = 0.5
    compare_to: str | None = None  # the full-logits case computing the same loss
    compile: bool = False  # fused: torch.compile the per-chunk maths
    chunk_size: int | None = None  # fused: override the preset's chunk size


def _ea_label(ea: bool, granularity: str) -> str:
    return f"ea-{'seq' if granularity == 'sequence' else 'token'}" if ea else "no-ea"


def build_cases() -> list[Case]:
    cases = [Case("floor", "floor", kd_ratio=0.0)]
    grid = [("fkl", False, "token"), ("fkl", True, "token"), ("fkl", True, "sequence"), ("rkl", True, "token"),
            ("jsd", True, "token")]
    for div, ea, gran in grid:
        cases.append(Case(f"full/{div}/{_ea_label(ea, gran)}", "full", div, ea, gran))
    for div, ea, gran in grid:
        name = f"{div}/{_ea_label(ea, gran)}"
        cases.append(Case(f"fused/{name}", "fused", div, ea, gran, compare_to=f"full/{name}"))
    for div, ea, gran in grid[:3]:  # the compiled chunk maths: EA off, token, sequence
        name = f"{div}/{_ea_label(ea, gran)}"
        cases.append(Case(f"fused-compiled/{name}", "fused", div, ea, gran, compare_to=f"full/{name}", compile=True))
    for compiled, chunk in ((False, 256), (True, 256), (True, 512)):  # smaller chunks: less memory, smaller GEMMs
        prefix = "fused-compiled" if compiled else "fused"
        cases.append(Case(f"{prefix}/fkl/ea-token/c{chunk}", "fused", "fkl", True, "token",
                          compare_to="full/fkl/ea-token", compile=compiled, chunk_size=chunk))
    # Pure KD without EA: the loss the peers compute (forward KL = TRL/Liger beta 0; JSD beta 0.5).
    for div in ("fkl", "jsd"):
        ref = f"fused/{div}/no-ea/kd-only"
        cases.append(Case(ref, "fused", div, False, "token", kd_ratio=1.0))
        cases.append(Case(f"fused-compiled/{div}/no-ea/kd-only", "fused", div, False, "token", kd_ratio=1.0,
                          compare_to=ref, compile=True))
        for kind, label in (("trl-gkd", "trl-gkd"), ("trl-chunked", "trl-distill-chunked"), ("liger", "liger")):
            cases.append(Case(f"{label}/{div}", kind, div, False, kd_ratio=1.0, compare_to=ref))
    return cases


# ----------------------------------------------------------------------------------------------------------------------
# Models, batch and step functions
# ----------------------------------------------------------------------------------------------------------------------


def build_models(preset: Preset, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if preset.arch == "qwen2" else (LlamaConfig,
                                                                                             LlamaForCausalLM)
    dtype = getattr(torch, preset.dtype)
    models = []
    for i, shape in enumerate((preset.teacher, preset.student)):
        config = config_cls(
            vocab_size=preset.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            tie_word_embeddings=shape.tie_word_embeddings,
            max_position_embeddings=max(4096, max(t for _, t in preset.shapes)),
            use_cache=False,
        )
        torch.manual_seed(seed + i)
        with torch.device(preset.device):
            model = model_cls(config)
        model.to(dtype)
        models.append(model)
    teacher, student = models
    teacher.eval().requires_grad_(False)
    student.train()
    if preset.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return teacher, student


def build_batch(preset: Preset, batch: int, seq: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, preset.vocab_size, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, : int(seq * preset.prompt_fraction)] = -100
    return {
        "input_ids": input_ids.to(preset.device),
        "attention_mask": torch.ones_like(input_ids).to(preset.device),
        "labels": labels.to(preset.device),
    }


def _hidden(model, batch):
    """Final (post-norm) hidden states without full logits: the backbone only."""
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def make_step(case: Case, preset: Preset, teacher, student, batch):
    """A closure running one training step (forward + backward) and returning the loss as a float tensor."""
    import torch
    import torch.nn.functional as F

    from eakd_llm.loss.chunked import LMHead, fused_distillation_loss
    from eakd_llm.loss.distillation import IGNORE_INDEX, LossSettings, distillation_loss, loss_denominator

    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = labels != IGNORE_INDEX
    n = loss_denominator(mask.sum(), None)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    vocab = min(w_s.shape[0], w_t.shape[0])
    settings = LossSettings(divergence=case.divergence, ea=case.ea, ea_granularity=case.granularity,
                            kd_ratio=case.kd_ratio)
    beta = 0.0 if case.divergence == "fkl" else 0.5  # the peers' generalized JSD: beta 0 is forward KL(p_T || p_S)

    if case.kind == "floor":

        def step():
            with torch.no_grad():
                _hidden(teacher, batch)
            loss = student(**fwd, labels=batch["labels"], use_cache=False).loss
            loss.backward()
            return loss

    elif case.kind == "full":

        def step():
            s_logits = student(**fwd, use_cache=False).logits[:, :-1]
            with torch.no_grad():
                t_logits = teacher(**fwd, use_cache=False).logits[:, :-1]
            ce = F.cross_entropy(s_logits.float().reshape(-1, s_logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            loss = (1 - case.kd_ratio) * ce / n + case.kd_ratio * distillation_loss(
                s_logits[..., :vocab], t_logits[..., :vocab], labels, settings, num_items_in_batch=n
            )
            loss.backward()
            return loss

    elif case.kind == "fused":

        def step():
            h_s = _hidden(student, batch)[:, :-1]
            with torch.no_grad():
                h_t = _hidden(teacher, batch)[:, :-1]
            loss = fused_distillation_loss(LMHead(h_s, w_s), LMHead(h_t, w_t), labels, settings, vocab_size=vocab,
                                           chunk_size=case.chunk_size or preset.chunk_size, compile=case.compile)
            loss.backward()
            return loss

    elif case.kind == "trl-gkd":
        try:
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
        except ImportError:
            from trl import GKDTrainer  # older TRL

        def step():
            s_logits = student(**fwd, use_cache=False).logits[:, :-1]
            with torch.no_grad():
                t_logits = teacher(**fwd, use_cache=False).logits[:, :-1]
            loss = GKDTrainer.generalized_jsd_loss(s_logits[..., :vocab], t_logits[..., :vocab], labels, beta=beta)
            loss.backward()
            return loss

    elif case.kind == "trl-chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step():
            h_s = _hidden(student, batch)[:, :-1]
            with torch.no_grad():
                h_t = _hidden(teacher, batch)[:, :-1]
            loss, _, _ = _chunked_divergence_loss(h_s, h_t, w_s[:vocab], w_t[:vocab], mask.long(), beta=beta)
            loss.backward()
            return loss

    elif case.kind == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, temperature=1.0, beta=beta)

        def step():
            h_s = _hidden(student, batch)[:, :-1]
            with torch.no_grad():
                h_t = _hidden(teacher, batch)[:, :-1]
            loss = loss_fn(h_s[mask], w_s[:vocab], h_t[mask], w_t[:vocab], labels[mask])
            loss.backward()
            return loss

    else:
        raise ValueError(case.kind)
    return step


def import_problem(case: Case) -> str | None:
    """Why a peer's implementation cannot be imported (None: importable)."""
    try:
        if case.kind == "trl-gkd":
            try:
                from trl.experimental.gkd.gkd_trainer import GKDTrainer
            except ImportError:
                from trl import GKDTrainer
            GKDTrainer.generalized_jsd_loss  # noqa: B018
        elif case.kind == "trl-chunked":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
        elif case.kind == "liger":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as error:  # ImportError, or a missing triton/CUDA raising something else at import
        return f"{type(error).__name__}: {error}".splitlines()[0][:200]
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    shape: str
    status: str = "ok"
    loss: float | None = None
    median_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    peak_mem_mib: float | None = None  # peak extra memory of the steps (see module docstring)
    peak_total_mib: float | None = None  # CUDA: the allocator's absolute peak during the steps (weights included)
    loss_diff_vs: str | None = None
    loss_abs_diff: float | None = None


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_memory(cuda: bool) -> int:
    """Start a peak-memory window; returns the baseline in bytes (CUDA: allocated; CPU: resident set)."""
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def run_case(case: Case, preset: Preset, batch_size: int, seq: int, steps: int, warmup: int, models=None) -> Result:
    """Run one case in this process (models: reuse (teacher, student), else build them)."""
    import torch

    result = Result(case.name, f"{batch_size}x{seq}")
    problem = import_problem(case)
    if problem is not None:
        result.status = f"not importable: {problem}"
        return result
    teacher, student = models if models is not None else build_models(preset)
    batch = build_batch(preset, batch_size, seq)
    cuda = preset.device == "cuda"
    step = make_step(case, preset, teacher, student, batch)
    times = []
    base = None
    try:
        for i in range(warmup + steps):
            student.zero_grad(set_to_none=True)
            if i == warmup:  # measure the peak of the timed (steady-state) steps only
                base = _reset_peak_memory(cuda)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = step()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if i == 0:
                result.loss = float(loss.detach().float())
            if i >= warmup:
                times.append(elapsed)
            del loss
    except torch.OutOfMemoryError:
        result.status = "OOM"
    except Exception as error:  # a peer failing at run time is reported, not fatal
        result.status = f"error: {type(error).__name__}: {error}".splitlines()[0][:300]
    finally:
        student.zero_grad(set_to_none=True)
    if base is not None:
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_kib("VmHWM") * 1024
        result.peak_mem_mib = (peak - base) / 2**20
        if cuda:
            result.peak_total_mib = peak / 2**20
    if times:
        result.step_times_s = times
        result.median_s = statistics.median(times)
        result.tokens_per_s = batch_size * seq / result.median_s
    if result.status == "OOM":
        result.median_s = result.tokens_per_s = None
    del step, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def memory_subprocess(case: Case, args, batch_size: int, seq: int) -> Result:
    """The CPU peak-memory measurement of one case: a fresh process, one warm-up step, then one measured step."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--steps", "1",
               "--warmup", "1", "--child", case.name, "--child-shape", f"{batch_size}x{seq}",
               "--child-out", str(out)]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        if args.shapes:
            cmd += ["--shapes", args.shapes]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        # Fixed small mmap threshold: every tensor-sized allocation is mmapped and unmapped when freed, so the resident
        # set follows the live memory (glibc's dynamic threshold would keep freed blocks of up to 32 MiB in the heap).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            killed = proc.returncode in (-9, 137)
            return Result(case.name, f"{batch_size}x{seq}", status="OOM" if killed else f"error: {tail[0][:300]}")
        return Result(**json.loads(out.read_text()))


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def environment(preset: Preset) -> dict:
    import importlib.metadata as md

    import torch

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    if preset.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    device = line.split(":", 1)[1].strip()
                    break
        device = f"CPU: {device} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    return {
        "device": device,
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("torch", "transformers", "trl", "liger-kernel", "triton", "eakd-llm")},
    }


def device_slug(preset: Preset) -> str:
    if preset.device == "cpu":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def add_comparisons(results: list[Result], cases: list[Case]) -> None:
    by_key = {(r.case, r.shape): r for r in results}
    compare = {c.name: c.compare_to for c in cases}
    for r in results:
        other = by_key.get((compare.get(r.case), r.shape))
        if other is not None and r.loss is not None and other.loss is not None:
            r.loss_diff_vs, r.loss_abs_diff = other.case, abs(r.loss - other.loss)


def markdown(payload: dict) -> str:
    """The results table of a benchmark's JSON payload."""
    preset, env, results = payload["preset"], payload["environment"], payload["results"]
    teacher, student = preset["teacher"], preset["student"]
    cuda = preset["device"] == "cuda"
    memory = (
        "CUDA allocator peak minus the memory allocated when the timed steps start (all cases in one process)."
        if cuda
        else "peak RSS increase of one step after a warm-up step, each case in a fresh subprocess (VmHWM reset via "
        "`/proc/self/clear_refs`; glibc `MALLOC_MMAP_THRESHOLD_=131072` so that freed tensors leave the resident set); "
        "the step times come from the main process (all cases on the same models, default allocator)."
    )
    lines = [
        f"# Benchmark `{preset['name']}` on {env['device']}",
        "",
        *([payload["note"], ""] if payload.get("note") else []),
        f"Packages: {', '.join(f'{k} {v}' for k, v in env['packages'].items())}; Python {env['python']}.",
        "",
        f"Models: {preset['arch']} configs with random weights, vocabulary {preset['vocab_size']:,}, "
        f"{preset['dtype']}; "
        f"teacher hidden {teacher['hidden_size']} x {teacher['num_hidden_layers']} layers, student hidden "
        f"{student['hidden_size']} x {student['num_hidden_layers']} layers"
        f"{', student gradient checkpointing' if preset['gradient_checkpointing'] else ''}. "
        f"The first {preset['prompt_fraction']:.0%} of each sequence is prompt (no loss). Fused chunk size "
        f"{preset['chunk_size']}. {preset['notes']}.",
        "",
        f"One step = teacher forward (no grad) + student forward + loss + backward (no optimizer step); median of "
        f"{payload['steps']} steps after {payload['warmup']} warm-up step(s); tokens/s = B x T / median. "
        f"Peak memory: {memory} `kd_ratio` 0.5 (CE + KD) except `kd-only` and the peers "
        "(pure KD: `fkl` is their beta 0, `jsd` beta 0.5). "
        "`Δloss`: absolute difference with the case computing the same loss; `peak vs`: that case's peak memory "
        "divided by this one's.",
        "",
    ]
    by_key = {(r["case"], r["shape"]): r for r in results}

    def fmt(value, spec):
        return format(value, spec) if value is not None else "—"

    total = cuda and any(r.get("peak_total_mib") is not None for r in results)
    for shape in dict.fromkeys(r["shape"] for r in results):
        lines += [
            f"## Batch {shape}",
            "",
            "| case | status | loss | Δloss (vs) | median step (s) | tokens/s | peak mem (MiB) | peak vs |"
            + (" peak total (GiB) |" if total else ""),
            "|---|---|---:|---|---:|---:|---:|---|" + ("---:|" if total else ""),
        ]
        for r in (r for r in results if r["shape"] == shape):
            ok = r["status"] == "ok"
            diff = f"{r['loss_abs_diff']:.1e} (`{r['loss_diff_vs']}`)" if r["loss_diff_vs"] else ""
            other = by_key.get((r["loss_diff_vs"], shape)) if r["loss_diff_vs"] else None
            ratio = ""
            if ok and other is not None and other["peak_mem_mib"] and r["peak_mem_mib"]:
                factor = other["peak_mem_mib"] / r["peak_mem_mib"]
                ratio = f"{factor:.1f}x lower" if factor >= 1 else f"{1 / factor:.1f}x higher"
            peak_total = r.get("peak_total_mib") if ok else None
            lines.append(
                f"| `{r['case']}` | {r['status']} | {fmt(r['loss'], '.6f')} | {diff} | {fmt(r['median_s'], '.3f')} | "
                f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_mem_mib'] if ok else None, ',.0f')} | {ratio} |"
                + (f" {fmt(peak_total / 1024 if peak_total is not None else None, '.2f')} |" if total else "")
            )
        lines.append("")
        lines += _target_lines(by_key, shape)
    return "\n".join(lines)


def _target_lines(by_key: dict, shape: str) -> list[str]:
    """The issue's targets, read off one shape's rows (only those whose rows exist and ran)."""

    def row(name):
        r = by_key.get((name, shape))
        return r if r is not None and r["status"] == "ok" and r["median_s"] else None

    lines = []
    for prefix in ("fused", "fused-compiled"):
        ea, plain, seq = (row(f"{prefix}/fkl/{label}") for label in ("ea-token", "no-ea", "ea-seq"))
        if ea and plain:
            cost = 100 * (ea["median_s"] / plain["median_s"] - 1)
            lines.append(f"- `{prefix}`: EA token weighting costs {cost:+.1f}% step time over the same loss without "
                         "EA (target <= 3%)")
        if ea and seq:
            cost = 100 * (seq["median_s"] / ea["median_s"] - 1)
            lines.append(f"- `{prefix}`: sequence granularity costs {cost:+.1f}% over token granularity (target <= 5%)")
    trl = row("trl-distill-chunked/fkl")
    for name in ("fused/fkl/ea-token", "fused-compiled/fkl/ea-token", "fused/fkl/ea-token/c256",
                 "fused-compiled/fkl/ea-token/c256", "fused-compiled/fkl/ea-token/c512"):
        ea = row(name)
        if ea is None:
            continue
        parts = [f"- `{name}`: {ea['tokens_per_s']:,.0f} tokens/s"]
        if trl:
            parts.append(f"{ea['tokens_per_s'] / trl['tokens_per_s']:.2f}x TRL chunked forward KL "
                         f"({trl['tokens_per_s']:,.0f}; target >= 1x)")
        if ea.get("peak_total_mib") is not None:
            parts.append(f"peak {ea['peak_total_mib'] / 1024:.2f} GiB in all (target <= 7 GiB)")
        lines.append(", ".join(parts))
    return (["Targets:", "", *lines, ""]) if lines else []


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="override the preset's fused chunk size")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--shapes", default=None, help="override the preset's shapes, e.g. 2x128,4x256")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default="", help="suffix of the result files' names (e.g. a subset run)")
    parser.add_argument("--in-process", action="store_true", help="CPU: run every case in this process")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown table of an earlier JSON result")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())) + "\n")
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    if args.preset is None:
        parser.error("--preset is required")
    preset = PRESETS[args.preset]
    if args.chunk_size is not None:
        preset.chunk_size = args.chunk_size
    if args.shapes:
        preset.shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    cases = build_cases()
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:  # one case in a fresh process (CPU memory measurement)
        case = next(c for c in build_cases() if c.name == args.child)
        batch_size, seq = map(int, args.child_shape.split("x"))
        result = run_case(case, preset, batch_size, seq, args.steps, args.warmup)
        Path(args.child_out).write_text(json.dumps(asdict(result)))
        return 0

    import torch

    if preset.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {preset.name} needs a CUDA GPU")
    env = environment(preset)
    print(f"{preset.name} on {env['device']}", flush=True)
    results: list[Result] = []
    memory_in_subprocess = preset.device == "cpu" and not args.in_process
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{preset.name}-{device_slug(preset)}{'-' + args.tag if args.tag else ''}"

    def write() -> None:  # after every case, so that a run cut short keeps what it measured
        add_comparisons(results, cases)
        payload = {"preset": asdict(preset), "environment": env, "steps": args.steps, "warmup": args.warmup,
                   "measurement": "cuda max_memory_allocated delta" if preset.device == "cuda"
                   else "VmHWM - VmRSS per fresh subprocess", "results": [asdict(r) for r in results]}
        # not stem.with_suffix: the stem's own dots ("qwen-1.5b-0.5b") would be taken for a suffix
        Path(f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        Path(f"{stem}.md").write_text(markdown(payload) + "\n")

    models = build_models(preset)
    for batch_size, seq in preset.shapes:
        for case in cases:
            start = time.perf_counter()
            # Timing: every case in this process, on the same models and batch.
            result = run_case(case, preset, batch_size, seq, args.steps, args.warmup, models=models)
            if memory_in_subprocess and not result.status.startswith("not importable"):
                memory = memory_subprocess(case, args, batch_size, seq)
                result.peak_mem_mib = memory.peak_mem_mib
                if memory.status != "ok" and result.status == "ok":
                    result.status = memory.status
            results.append(result)
            write()
            print(f"  {result.shape:>8} {case.name:<34} {result.status[:60]:<12} loss={result.loss} "
                  f"median={result.median_s} peak={result.peak_mem_mib and round(result.peak_mem_mib)} MiB "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

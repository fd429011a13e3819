"""A/B check of the loss across a code change: dump, then compare bit for bit.

Runs a fixed grid of 300 loss configurations (6 divergences x token/sequence EA x 3 formulas x 2 normalisations x
kd_ratio 0.5/1 x chunk sizes 4/1024, plus plain KD per divergence and chunk size) through the fused chunked loss with a
live teacher, a cached top-5 teacher for a subset, and the full-logits :func:`distillation_loss` reference, and saves
every loss, every student gradient and every statistic. Run it on two commits and compare with ``torch.equal``::

    python scripts/loss_ab.py dump --output /tmp/after.safetensors
    git stash; python scripts/loss_ab.py dump --output /tmp/before.safetensors; git stash pop
    python scripts/loss_ab.py compare /tmp/before.safetensors /tmp/after.safetensors
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from safetensors.torch import load_file, save_file

from eakd_llm.loss.chunked import LMHead, fused_distillation_loss
from eakd_llm.loss.distillation import (
    DIVERGENCES,
    EA_FORMULAS,
    EA_NORMALIZATIONS,
    GRANULARITIES,
    IGNORE_INDEX,
    LossSettings,
    SparseTeacher,
    distillation_loss,
    entropy_from_log_probs,
    log_probs,
)

B, T, H, V, TOP_K = 2, 9, 16, 50, 5


def grid() -> list[tuple[str, LossSettings, int]]:
    """(name, settings, chunk size) of every configuration, in a fixed order."""
    cases = []
    for divergence, chunk in itertools.product(DIVERGENCES, (4, 1024)):
        cases.append((f"{divergence}/no-ea/r0.5/c{chunk}", LossSettings(divergence=divergence, ea=False), chunk))
        for granularity, formula, normalize, ratio in itertools.product(GRANULARITIES, EA_FORMULAS, EA_NORMALIZATIONS,
                                                                        (0.5, 1.0)):
            settings = LossSettings(divergence=divergence, ea_granularity=granularity, ea_formula=formula,
                                    ea_normalize=normalize, kd_ratio=ratio, temperature=1.5)
            cases.append((f"{divergence}/{granularity}/{formula}/{normalize}/r{ratio}/c{chunk}", settings, chunk))
    return cases


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    return {
        "student_hidden": torch.randn(B, T, H, generator=generator),
        "student_weight": torch.randn(V, H, generator=generator) * 0.3,
        "student_bias": torch.randn(V, generator=generator) * 0.1,
        "teacher_hidden": torch.randn(B, T, H, generator=generator),
        "teacher_weight": torch.randn(V, H, generator=generator) * 0.4,
        "labels": labels,
    }


def sparse_teacher(x: dict[str, torch.Tensor], settings: LossSettings) -> SparseTeacher:
    logits = (x["teacher_hidden"] @ x["teacher_weight"].T)[x["labels"] != IGNORE_INDEX]
    at_tau = log_probs(logits, settings.temperature)
    top, ids = at_tau.topk(TOP_K, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return SparseTeacher(ids, top, tail, entropy_from_log_probs(log_probs(logits, settings.entropy_temperature)))


def run_case(x: dict[str, torch.Tensor], settings: LossSettings, chunk: int, sparse: bool) -> dict[str, torch.Tensor]:
    hidden = x["student_hidden"].clone().requires_grad_()
    weight = x["student_weight"].clone().requires_grad_()
    bias = x["student_bias"].clone().requires_grad_()
    teacher = (sparse_teacher(x, settings) if sparse else LMHead(x["teacher_hidden"], x["teacher_weight"]))
    loss, stats = fused_distillation_loss(LMHead(hidden, weight, bias), teacher, x["labels"], settings,
                                          chunk_size=chunk, return_stats=True)
    loss.backward()
    out = {"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad, "grad_bias": bias.grad}
    out.update({f"stat_{k}": v.detach().reshape(-1) for k, v in stats.items()})
    return out


def reference_case(x: dict[str, torch.Tensor], settings: LossSettings) -> dict[str, torch.Tensor]:
    student_logits = (x["student_hidden"] @ x["student_weight"].T + x["student_bias"]).requires_grad_()
    teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
    loss, stats = distillation_loss(student_logits, teacher_logits, x["labels"], settings, return_stats=True)
    loss.backward()
    out = {"loss": loss.detach(), "grad_logits": student_logits.grad}
    out.update({f"stat_{k}": v.detach().reshape(-1) for k, v in stats.items()})
    return out


def dump(path: str) -> int:
    torch.manual_seed(0)
    x = inputs()
    tensors: dict[str, torch.Tensor] = {}
    cases = grid()
    for name, settings, chunk in cases:
        routes = {"live": run_case(x, settings, chunk, sparse=False)}
        if chunk == 4 and settings.kd_ratio == 0.5:
            routes["cached"] = run_case(x, settings, chunk, sparse=True)
            routes["full"] = reference_case(x, settings)
        for route, values in routes.items():
            tensors.update({f"{name}/{route}/{key}": value.contiguous() for key, value in values.items()})
    save_file(tensors, path)
    print(f"{len(cases)} configurations, {len(tensors)} tensors -> {path}")
    return 0


def compare(before: str, after: str) -> int:
    a, b = load_file(before), load_file(after)
    if set(a) != set(b):
        print(f"different tensor names: {sorted(set(a) ^ set(b))[:10]}")
        return 1
    differ = [name for name in sorted(a) if not torch.equal(a[name], b[name])]
    print(f"{len(a) - len(differ)} of {len(a)} tensors identical (torch.equal)")
    for name in differ[:20]:
        print(f"  differs: {name} (max |diff| {(a[name].double() - b[name].double()).abs().max().item():.3g})")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dump").add_argument("--output", required=True)
    compare_parser = commands.add_parser("compare")
    compare_parser.add_argument("before")
    compare_parser.add_argument("after")
    args = parser.parse_args(argv)
    return dump(args.output) if args.command == "dump" else compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())

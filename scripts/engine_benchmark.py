"""The teacher on an inference engine, measured on the real pair (docs/inference-engine.md).

    python scripts/engine_benchmark.py --study-dir runs/smollm2-curve --output docs/inference-engine/benchmark

On a study folder (``eakd-llm study``: the teacher SmolLM2-135M-Instruct, its pruned student, the teacher's chat
answers), with the study's KD recipe:

1. **Routes to the teacher's exact H_T**, each against a transformers forward of the same token ids: (a) vLLM's
   full-vocabulary prompt log-probabilities (``prompt_logprobs: -1``), (b) vLLM's per-token final hidden states with
   the head applied here (what the project uses), (c) top-k prompt log-probabilities (exact values, but H_T only
   estimable: the tail spread uniformly, as DistillKit does). Payload per token, seconds, error.
2. **Cache build speed**: ``cache-teacher`` through transformers vs through the engine, same examples, tokens/s, and
   the two caches compared entry by entry.
3. **Training step speed**: the study's KD recipe for ``--steps`` steps with the live teacher vs the served one.
4. **How much to store**: per response token, fixed k in {8, 20, 64, 128} vs an entropy-adaptive k (the smallest k
   whose top-k mass reaches a target, between a floor and a ceiling): bytes per token and the error of the top-k +
   tail forward KL (the loss the cache trains) against the exact full-vocabulary KL of the pruned student.

Every number is measured on this machine; the output names it.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eakd_llm._atomic import write_text_atomic  # noqa: E402
from eakd_llm.teacher.cache import bytes_per_token  # noqa: E402

FIXED_K = (8, 20, 64, 128)
ADAPTIVE = ((0.90, 4, 128), (0.95, 4, 128), (0.99, 8, 256))  # (top-k mass target, floor, ceiling)


def _post(url: str, body: dict) -> tuple[bytes, float]:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        raw = response.read()
    return raw, time.perf_counter() - start


def _examples(config, tokenizer, count: int) -> list[dict]:
    from eakd_llm.data.dataset import build_dataset, load_split

    dataset = build_dataset(load_split(config.dataset_name, config.dataset_train_split, None), config, tokenizer,
                            split=config.dataset_train_split, max_samples=count)
    return [dataset[i] for i in range(len(dataset))]


def _reference(model, examples) -> list[torch.Tensor]:
    """Transformers' full logits of every example ``[T, V]``, float32."""
    out = []
    with torch.no_grad():
        for example in examples:
            out.append(model(torch.tensor([example["input_ids"]])).logits[0].float())
    return out


def _entropy(logits: torch.Tensor, tau: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits / tau, -1)
    return -(log_p.exp() * log_p).sum(-1)


def routes(teacher: str, examples, reference, threads: int) -> dict:
    """(a), (b), (c) on the same token ids, each against the transformers logits."""
    from eakd_llm.models.loading import load_output_head
    from eakd_llm.teacher.engine import EngineServer

    weight, _, _, _ = load_output_head(teacher, "float32")
    result: dict = {}
    tokens = sum(len(e["input_ids"]) for e in examples)
    with EngineServer(teacher, dtype="float32", max_model_len=512) as server:
        rows = [e["input_ids"] for e in examples]
        raw, seconds = _post(f"{server.url}/pooling", {"model": server.model, "input": rows, "task": "token_embed",
                                                       "encoding_format": "base64", "embed_dtype": "float32"})
        data = sorted(json.loads(raw)["data"], key=lambda item: item["index"])
        err_lp = err_h = 0.0
        for item, ids, ref in zip(data, rows, reference):
            hidden = torch.frombuffer(bytearray(base64.b64decode(item["data"])), dtype=torch.float32)
            logits = hidden.reshape(len(ids), -1) @ weight.t()
            err_lp = max(err_lp, (torch.log_softmax(logits, -1) - torch.log_softmax(ref, -1)).abs().max().item())
            for tau in (1.0, 2.0):
                err_h = max(err_h, (_entropy(logits, tau) - _entropy(ref, tau)).abs().max().item())
        result["b_hidden_states"] = {"bytes_per_token": len(raw) / tokens, "seconds_per_token": seconds / tokens,
                                     "max_abs_log_prob_error": err_lp, "max_abs_entropy_error": err_h,
                                     "exact_entropy": True}
    with EngineServer(teacher, dtype="float32", max_model_len=512, runner="generate", max_logprobs=-1) as server:
        for name, k, subset in (("a_full_vocabulary", -1, examples[:2]), *((f"c_top_{k}", k, examples) for k in
                                                                             (20, 64, 128))):
            total = bytes_ = seconds = 0.0
            err = 0.0
            for example, ref in zip(subset, reference):
                ids = example["input_ids"]
                raw, took = _post(f"{server.url}/v1/completions", {"model": server.model, "prompt": ids,
                                                                   "max_tokens": 1, "prompt_logprobs": k})
                bytes_, seconds, total = bytes_ + len(raw), seconds + took, total + len(ids)
                served = json.loads(raw)["choices"][0]["prompt_logprobs"]
                log_p = torch.log_softmax(ref, -1)
                for pos in range(1, len(ids)):
                    for token, entry in served[pos].items():
                        err = max(err, abs(entry["logprob"] - log_p[pos - 1, int(token)].item()))
            result[name] = {"bytes_per_token": bytes_ / total, "seconds_per_token": seconds / total,
                            "max_abs_log_prob_error": err, "exact_entropy": k == -1, "tokens": int(total)}
    result["threads"] = threads
    return result


def topk_entropy_estimate(reference, examples, tau: float, k: int) -> dict:
    """H_T from the top-k at tau plus the tail spread uniformly over the other V - k tokens, against the exact H_T,
    at response positions: what a top-k-only engine route could give EA."""
    errors, exact = [], []
    for ref, example in zip(reference, examples):
        mask = torch.tensor(example["labels"][1:]) != -100
        log_p = torch.log_softmax(ref[:-1][mask] / tau, -1)
        top = log_p.topk(k, -1).values
        tail = (1 - top.exp().sum(-1)).clamp(min=1e-12)
        estimate = -(top.exp() * top).sum(-1) - tail * (tail.log() - math.log(ref.shape[-1] - k))
        truth = -(log_p.exp() * log_p).sum(-1)
        errors.append(estimate - truth)
        exact.append(truth)
    errors, exact = torch.cat(errors), torch.cat(exact)
    return {"mean_abs_error": errors.abs().mean().item(), "max_abs_error": errors.abs().max().item(),
            "mean_relative_error": (errors.abs() / exact.clamp(min=1e-6)).mean().item(),
            "mean_exact_entropy": exact.mean().item()}


def storage(reference, student_logits, examples, tau: float, vocab: int) -> dict:
    """Bytes per token and the top-k + tail forward KL's error against the full KL, fixed vs adaptive k."""
    rows_t, rows_s = [], []
    for ref, stu, example in zip(reference, student_logits, examples):
        mask = torch.tensor(example["labels"][1:]) != -100
        rows_t.append(torch.log_softmax(ref[:-1][mask][:, :vocab] / tau, -1))
        rows_s.append(torch.log_softmax(stu[:-1][mask][:, :vocab] / tau, -1))
    log_t, log_s = torch.cat(rows_t), torch.cat(rows_s)
    full = (log_t.exp() * (log_t - log_s)).sum(-1)
    order = log_t.argsort(-1, descending=True)[:, :256]
    top_t, top_s = log_t.gather(-1, order), log_s.gather(-1, order)
    mass = top_t.exp().cumsum(-1)

    def bucketed(k: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(top_t.shape[1]) < k.unsqueeze(-1)
        p = top_t.exp() * keep
        kl_top = (p * (top_t - top_s)).sum(-1)
        tail_t = (1 - p.sum(-1)).clamp(min=1e-12)
        tail_s = (1 - (top_s.exp() * keep).sum(-1)).clamp(min=1e-12)
        return kl_top + tail_t * (tail_t.log() - tail_s.log())

    def row(name: str, k: torch.Tensor) -> dict:
        approx = bucketed(k)
        per_token = sum(bytes_per_token(int(kk), vocab, "float16") for kk in k.tolist()) / len(k)
        return {"name": name, "mean_k": k.float().mean().item(), "bytes_per_token": per_token
                + (2 if name.startswith("adaptive") else 0),  # adaptive: each token's k, 2 bytes
                "kl_relative_error": ((full - approx).sum() / full.sum()).item(),
                "kl_per_token_mean_abs_error": (full - approx).abs().mean().item()}

    rows = [row(f"fixed k={k}", torch.full((len(full),), k)) for k in FIXED_K]
    for target, floor, ceiling in ADAPTIVE:
        k = ((mass < target).sum(-1) + 1).clamp(floor, ceiling)
        rows.append(row(f"adaptive mass>={target} k in [{floor},{ceiling}]", k))
    return {"tokens": len(full), "mean_full_kl": full.mean().item(), "rows": rows}


def speeds(config_for, cache_dir: Path, server_url: str, steps: int) -> dict:
    from eakd_llm.teacher.cache import build_cache
    from eakd_llm.training.train import run_training

    out: dict = {}
    for name, server in (("transformers", None), ("vllm", server_url)):
        folder = cache_dir / f"cache-{name}"
        start = time.perf_counter()
        manifest = build_cache(config_for(), str(folder), top_k=64, value_format="float32", show_progress=False,
                               server=server)
        seconds = time.perf_counter() - start
        tokens = sum(entry["tokens"] for entry in manifest.splits.values())
        out[f"cache_{name}"] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
    from safetensors.torch import load_file

    worst = {"values": 0.0, "entropy": 0.0, "log_tail": 0.0}
    same_ids = total = 0
    for shard in sorted(os.listdir(cache_dir / "cache-vllm")):
        if shard.endswith(".safetensors"):
            a, b = load_file(str(cache_dir / "cache-transformers" / shard)), load_file(str(cache_dir / "cache-vllm"
                                                                                          / shard))
            same_ids += int((a["ids"] == b["ids"]).all(-1).sum())
            total += a["ids"].shape[0]
            for key in worst:
                worst[key] = max(worst[key], (a[key].float() - b[key].float()).abs().max().item())
    out["cache_agreement"] = {"rows_with_identical_ids": same_ids, "rows": total, **{f"max_abs_{k}_error": v
                                                                                     for k, v in worst.items()}}
    for name, extra in (("live", {}), ("served", {"teacher_server": server_url})):
        trainer = run_training(config_for(max_steps=steps, output_dir=str(cache_dir / f"run-{name}"), **extra))
        runtime = trainer.state.log_history[-1]["train_runtime"]
        out[f"step_{name}"] = {"steps": steps, "seconds_per_step": runtime / steps}
        if name == "served":
            out["step_served"]["batches_asked_ahead"] = trainer.teacher_source.prefetched
            out["step_served"]["batches_asked_at_the_step"] = trainer.teacher_source.waited
    return out


def markdown(result: dict) -> str:
    r, lines = result["routes"], []
    commands = sorted(set(result["commands"].values()))
    lines += [f"# The teacher on an inference engine: measured ({result['machine']})", "",
              *[f"`{command}`" for command in commands], "",
              f"Torch threads {result['threads']}; vLLM {result['vllm']} on the same CPU (it serves with one thread).",
              "",
              "## Routes to the teacher's distribution (against a transformers forward of the same ids)", "",
              "| route | payload / token | s / token | max abs log-prob error | H_T |", "|---|---:|---:|---:|---|"]
    names = {"a_full_vocabulary": "(a) prompt log-probs, full vocabulary", "b_hidden_states":
             "(b) final hidden states, head applied here", "c_top_20": "(c) top-20 prompt log-probs",
             "c_top_64": "(c) top-64 prompt log-probs", "c_top_128": "(c) top-128 prompt log-probs"}
    for key, label in names.items():
        row = r[key]
        h_t = "exact" if row["exact_entropy"] else "estimate only (below)"
        if key == "b_hidden_states":
            h_t = f"exact (max error {row['max_abs_entropy_error']:.1e})"
        lines.append(f"| {label} | {row['bytes_per_token'] / 1e3:,.1f} kB | {row['seconds_per_token']:.4f} | "
                     f"{row['max_abs_log_prob_error']:.1e} | {h_t} |")
    lines += ["", "H_T estimated from the top-k (tail spread uniformly over the other tokens) against the exact H_T, "
              "response tokens:", "", "| k | τ′ | mean exact H_T | mean abs error | max abs error | mean relative "
              "error |", "|---:|---:|---:|---:|---:|---:|"]
    for row in result["entropy_estimates"]:
        lines.append(f"| {row['k']} | {row['tau']:g} | {row['mean_exact_entropy']:.3f} | {row['mean_abs_error']:.3f}"
                     f" | {row['max_abs_error']:.3f} | {row['mean_relative_error']:.1%} |")
    s = result["speeds"]
    lines += ["", "## Speed, side by side", "", "| what | transformers / live | vLLM / served |", "|---|---:|---:|",
              f"| cache build, response tokens / s | {s['cache_transformers']['tokens_per_second']:.1f} | "
              f"{s['cache_vllm']['tokens_per_second']:.1f} |",
              f"| training step, s ({s['step_live']['steps']} steps) | {s['step_live']['seconds_per_step']:.2f} | "
              f"{s['step_served']['seconds_per_step']:.2f} |", "",
              f"Served steps: {s['step_served']['batches_asked_ahead']} batches were asked for ahead, "
              f"{s['step_served']['batches_asked_at_the_step']} at their step.", "",
              "The two caches (top-64, fp32): "
              f"{s['cache_agreement']['rows_with_identical_ids']} of {s['cache_agreement']['rows']} tokens with the "
              f"same top-64 ids; max abs error of the log-probs {s['cache_agreement']['max_abs_values_error']:.1e}, "
              f"of the tail {s['cache_agreement']['max_abs_log_tail_error']:.1e}, of H_T "
              f"{s['cache_agreement']['max_abs_entropy_error']:.1e}.", ""]
    lines += ["## How much to store: fixed vs entropy-adaptive k", ""]
    for student, st in result["storage"].items():
        lines += [f"Student `{student}`: {st['tokens']} response tokens, forward KL at τ = 1 (mean exact "
                  f"{st['mean_full_kl']:.3f} nats per token); values fp16. The error is full KL minus the top-k + "
                  "tail KL the cache trains (never negative).", "",
                  "| k | mean k | bytes / token | KL error (relative, summed) | mean abs KL error per token |",
                  "|---|---:|---:|---:|---:|"]
        for row in st["rows"]:
            lines.append(f"| {row['name']} | {row['mean_k']:.1f} | {row['bytes_per_token']:.0f} | "
                         f"{row['kl_relative_error']:+.2%} | {row['kl_per_token_mean_abs_error']:.4f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _portable(argv: list[str]) -> list[str]:
    """The command line as committed: an absolute path becomes its last two parts (no machine's folders)."""
    return [os.path.join(*Path(a).parts[-2:]) if os.path.isabs(a) else a for a in argv]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-dir", required=True, help="a study folder (teacher, student-pruned, data)")
    parser.add_argument("--recipe", default=str(REPO / "recipes/smollm2-135m_pruned/kd.yaml"))
    parser.add_argument("--examples", type=int, default=64, help="training examples for the cache and routes")
    parser.add_argument("--route-examples", type=int, default=8, help="examples for the route comparison")
    parser.add_argument("--steps", type=int, default=10, help="training steps per teacher source")
    parser.add_argument("--storage-examples", type=int, default=64, help="examples for the storage table")
    parser.add_argument("--sections", default="routes,storage,speeds",
                        help="what to measure (comma-separated); the others are kept from an existing STEM.json")
    parser.add_argument("--students", nargs="+", default=["student-pruned", "learning-curve/kd-seed-1"],
                        help="students (in the study folder) whose KL the storage table measures")
    parser.add_argument("--output", required=True, help="output stem: writes STEM.json and STEM.md")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from eakd_llm.config.recipe import load_recipe
    from eakd_llm.models.loading import load_tokenizer
    from eakd_llm.teacher.engine import EngineServer, ensure_vllm_env

    output = Path(args.output).resolve()
    recipe = str(Path(args.recipe).resolve())
    os.chdir(args.study_dir)
    work = Path(tempfile.mkdtemp(prefix="engine-benchmark-"))

    def config_for(**overrides):
        values = {"max_train_samples": args.examples, "output_dir": str(work / "run"), "use_cpu": True,
                  "disable_tqdm": True, "max_steps": args.steps, "save_strategy": "no", "dataset_eval_split": None}
        values.update(overrides)
        return load_recipe(recipe, [f"--{k}={'null' if v is None else v}" for k, v in values.items()])

    config = config_for()
    teacher = os.path.realpath(config.teacher_model_name_or_path)
    tokenizer = load_tokenizer(config.model_name_or_path)
    sections = set(args.sections.split(","))
    unknown = sections - {"routes", "storage", "speeds"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}")
    stem = output.with_suffix(".json")
    result = json.loads(stem.read_text(encoding="utf-8")) if stem.is_file() else {}
    env = ensure_vllm_env()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                   platform.processor() or platform.machine())
    result.update({"machine": f"{cpu}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
                   "vllm": json.loads((env / "eakd-llm-engine.json").read_text())["vllm"]})
    result.setdefault("commands", {})
    for section in sections:
        result["commands"][section] = "python scripts/engine_benchmark.py " + " ".join(_portable(argv or
                                                                                                  sys.argv[1:]))
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    if "routes" in sections:
        examples = _examples(config, tokenizer, args.route_examples)
        reference = _reference(model, examples)
        result["routes"] = routes(teacher, examples, reference, torch.get_num_threads())
        result["entropy_estimates"] = [{"k": k, "tau": tau, **topk_entropy_estimate(reference, examples, tau, k)}
                                       for tau in (1.0, 2.0) for k in (20, 64, 128)]
        del reference
    if "storage" in sections:
        examples = _examples(config, tokenizer, args.storage_examples)
        reference = _reference(model, examples)
        result["storage"] = {}
        for name in args.students:
            student = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
            result["storage"][name] = storage(reference, _reference(student, examples), examples, 1.0,
                                              reference[0].shape[-1])
            del student
        del reference
    del model
    if "speeds" in sections:
        with EngineServer(teacher, dtype="float32", max_model_len=config.max_length) as server:
            result["speeds"] = speeds(config_for, work, server.url, args.steps)
    shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text_atomic(output.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

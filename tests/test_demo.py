"""``eakd-llm demo``: the plan, the per-example teacher cache, and ``--quick --full`` end to end (the files, rows,
learning curves, continued runs, comparisons and console lines the README's main job promises)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eakd_llm.studies.demo import COMPARISONS, DEFAULT, METHODS, QUICK, CachedTeacher, plan_runs
from eakd_llm.studies.demo_plan import FULL_COMPARISONS, FULL_METHODS, INIT_FROM, depends_on

REPO = Path(__file__).resolve().parents[1]


def test_cached_teacher_returns_the_same_hidden_states_per_example(tiny_stack):
    from transformers import AutoModelForCausalLM

    from eakd_llm.models.loading import final_hidden_states

    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    cached = CachedTeacher(teacher)
    ids = torch.tensor([[0, 5, 9, 12], [0, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    first = cached(input_ids=ids, attention_mask=mask).logits
    assert (cached.hits, cached.misses) == (0, 2)
    with torch.no_grad():
        direct = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(first[real], direct.logits[real], atol=1e-5, rtol=1e-5)
    # the fused loss asks for hidden states, through the same helper as for any model; an example is found again in
    # another batch (another row, another padding width)
    again = final_hidden_states(cached, input_ids=torch.tensor([[0, 7, 8], [3, 3, 3]]),
                                attention_mask=torch.ones(2, 3, dtype=torch.long))
    assert (cached.hits, cached.misses) == (1, 3)
    torch.testing.assert_close(again[0], direct.hidden_states[-1][1, :3], atol=1e-5, rtol=1e-5)
    # packed or left-padded batches are computed whole, never mixed up with the right-padded entries
    left = torch.tensor([[0, 1, 1, 1]])
    torch.testing.assert_close(final_hidden_states(cached, input_ids=ids[1:], attention_mask=left),
                               final_hidden_states(teacher, input_ids=ids[1:], attention_mask=left))
    assert (cached.hits, cached.misses) == (1, 3)


def test_precomputed_teacher_states_do_not_depend_on_the_batch_a_run_asks_in(tiny_stack):
    from transformers import AutoModelForCausalLM

    from eakd_llm.models.loading import final_hidden_states

    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    sequences = [[0, 5, 9, 12, 4], [0, 7, 8], [3, 3, 3, 3, 3, 3, 3], [0, 7, 8]]  # a repeat is stored once
    cached = CachedTeacher(teacher)
    cached.precompute(sequences, batch_size=3)
    assert len(cached.cache) == 3 and cached.misses == 3  # batches [0, 1, 2] and [3]: the repeat is a hit
    stored = {key: value.clone() for key, value in cached.cache.items()}
    # asked again in other batch shapes (alone, beside a longer row): the very same tensors, nothing recomputed
    for ids, mask in ((torch.tensor([[0, 7, 8]]), torch.ones(1, 3, dtype=torch.long)),
                      (torch.tensor([[0, 7, 8, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3]]),
                       torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7]))):
        out = final_hidden_states(cached, input_ids=ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            assert torch.equal(out[row, :length], stored[ids[row, :length].numpy().tobytes()])
    assert cached.misses == 3 and len(cached.cache) == 3
    with torch.no_grad():  # and they are the teacher's states
        direct = teacher(input_ids=torch.tensor([sequences[0]]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(stored[torch.tensor(sequences[0]).numpy().tobytes()], direct, atol=1e-5, rtol=1e-5)


def test_the_plan_is_fixed_before_training():
    headline = plan_runs(DEFAULT)
    assert [(r.name, r.train_seed) for r in headline] == [(n, s) for s in DEFAULT.train_seeds for n in METHODS]
    assert len(DEFAULT.train_seeds) >= 3 and {r.group for r in headline} == {"main"}
    assert "on-policy" not in " ".join(METHODS) and "k-cache" not in " ".join(METHODS)  # both are --full rows
    runs = plan_runs(DEFAULT, full=True)
    assert set(headline) < set(runs)  # --full adds runs, it changes none
    main = [r for r in runs if r.group == "main"]
    assert len(main) == (len(METHODS) + len(FULL_METHODS)) * len(DEFAULT.train_seeds)
    ablation = [r for r in runs if r.group == "ablation"]
    # tau' x kd_ratio x {raw, normalised}, less the two points that are headline runs of the first seed
    assert len(ablation) == len(DEFAULT.ablation_taus) * len(DEFAULT.ablation_ratios) * 2 - 2
    assert {r.train_seed for r in ablation} == {DEFAULT.train_seeds[0]}
    assert len({r.slug for r in runs}) == len(runs)
    assert {a for a, _ in COMPARISONS} | {b for _, b in COMPARISONS} <= set(METHODS)
    assert {a for a, _ in FULL_COMPARISONS} | {b for _, b in FULL_COMPARISONS} <= set(METHODS) | set(FULL_METHODS)
    # every dependent run waits for a method of the same study; each on-policy continuation has an off-policy twin
    # continuing the same trained student
    for name in [*METHODS, *FULL_METHODS]:
        assert depends_on(name) in (None, *METHODS)
    on_policy = [n for n in INIT_FROM if "on-policy" in n]
    assert on_policy and all(INIT_FROM[n.replace("on-policy λ=0.5", "off-policy")] == INIT_FROM[n] for n in on_policy)
    assert plan_runs(DEFAULT, full=True) == runs  # nothing random, nothing picked after the fact


@pytest.mark.slow
def test_demo_quick_full_writes_results_curves_comparisons_and_plots(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "eakd_llm.cli", "demo", "--quick", "--full", "--output-dir",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:] + (out / "demo.log").read_text()[-4000:]
    # The console: stage lines and one line per finished run; the libraries' output went to the log.
    assert "teacher SFT" in result.stdout and "Tokenizing" not in result.stdout
    runs = plan_runs(QUICK, full=True)
    tasks = len(runs) + 3  # and the teacher's SFT, its evaluation, its cache
    assert f"[{tasks}/{tasks}]" in result.stdout and result.stdout.count(f"/{tasks}] ") == tasks
    assert "Tokenizing" in (out / "demo.log").read_text()

    results = json.loads((out / "results.json").read_text())
    assert str(out) not in (out / "results.json").read_text()  # paths relative to the output folder
    methods = results["methods"]
    assert results["study"] == "full" and list(methods) == ["Teacher (SFT)", *METHODS, *FULL_METHODS]
    steps = list(range(0, QUICK.student_steps + 1, QUICK.eval_steps))
    for name, row in methods.items():
        for metric in ("rougeL", "exact_match"):
            assert 0.0 <= row[metric]["mean"] <= 100.0
        if name == "Teacher (SFT)":
            continue
        assert row["train_seeds"] == list(QUICK.train_seeds)
        # the learning curve: validation CE at step 0 and every eval_steps, its last point the final validation CE
        curve = row["learning_curve"]
        assert curve["steps"] == (steps if name not in INIT_FROM else [0, QUICK.continue_steps])
        assert curve["mean"][-1] == pytest.approx(row["eval_ce_loss"]["mean"], rel=1e-4)
    scale = methods["KD × s_eff"]["kd_scale"]["mean"]
    assert scale == pytest.approx(methods["EA-KD token"]["ea_effective_scale"]["mean"])  # measured
    for name, source in INIT_FROM.items():
        # a continued run starts from the same seed's trained student: its step-0 validation CE is that student's
        assert methods[name]["learning_curve"]["mean"][0] == pytest.approx(
            methods[source]["learning_curve"]["mean"][-1], rel=1e-4)
        assert [r["init_from"] for r in methods[name]["per_run"]] == [r["output_dir"] for r in
                                                                      methods[source]["per_run"]]
        assert methods[name]["steps"] == QUICK.continue_steps
    assert methods["KD, continued on-policy λ=0.5"]["generation_time_share"]["mean"] > 0
    assert methods["KD, continued off-policy"]["generation_time_share"] is None
    names = {c["name"] for c in results["comparisons"]}
    assert names == {f"{a} − {b}" for a, b in COMPARISONS + FULL_COMPARISONS}
    for comparison in results["comparisons"]:
        assert set(comparison) >= {"name", "metric", "mean_diff", "ci_low", "ci_high", "verdict"}
        assert comparison["ci_low"] <= comparison["mean_diff"] <= comparison["ci_high"]
    assert len(results["ablation"]) == len(QUICK.ablation_taus) * len(QUICK.ablation_ratios) * 2
    assert results["teacher_cache"]["bytes_per_token"] > 0

    table = (out / "results.md").read_text()
    for name in methods:
        assert f"| {name}" in table
    assert "## Paired differences (A − B)" in table and "## Learning curves" in table
    assert "| step | SFT | KD |" in table and "![learning curves](learning_curves.png)" in table
    assert any(f"→ {verdict}" in table for verdict in ("better", "worse", "not distinguishable at 95%"))
    assert "| τ′ | kd_ratio | weights |" in table
    for plot in ("rougeL.png", "learning_curves.png", "entropy_distributions.png", "paired_differences.png"):
        assert (out / plot).stat().st_size > 5000
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_demo_run_reuses_the_trained_teacher(tiny_stack, tmp_path):
    from dataclasses import replace

    from eakd_llm.studies.demo import _train_teacher

    plan = replace(QUICK, teacher_steps=3, num_train=400)
    root = tmp_path / "demo"
    root.mkdir()
    folder, seconds = _train_teacher(root, plan, tiny_stack)
    assert seconds is not None and (Path(folder) / "model.safetensors").exists()
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert _train_teacher(root, plan, tiny_stack) == (folder, None)  # reused, not trained again
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp
    assert _train_teacher(root, replace(plan, teacher_steps=4), tiny_stack)[1] is not None  # another plan: retrained


def test_results_md_names_the_interval_method_the_comparisons_used(tmp_path):
    import numpy as np

    from eakd_llm.studies.demo_report import write_markdown
    from eakd_llm.studies.statistics import paired_difference, verdict_line

    rng = np.random.default_rng(0)
    b = rng.normal(20, 5, size=(3, 2, 40))
    comparison = paired_difference(b + 1.0 + rng.normal(0, 1, size=b.shape), b, "EA-KD token − KD", "rougeL")
    comparison["line"] = verdict_line(comparison, "ROUGE-L")
    results = {"plan": {"train_seeds": [1, 2, 3], "sampling_seeds": [10, 20], "student_steps": 5, "batch_size": 2},
               "num_test_records": 40, "machine": "test", "total_seconds": 1.0, "teacher_cache": None,
               "methods": {}, "comparisons": [comparison, {**comparison, "metric": "exact_match"}], "ablation": []}
    text = write_markdown(results, tmp_path / "results.md")
    paragraph = next(line for line in text.splitlines() if line.startswith("Paired by training seed"))
    assert f"95% interval: {comparison['method']} (every seed" in paragraph  # once, though two comparisons use it
    assert paragraph.count("crossed design") == 1 and "bootstrap" not in paragraph
    assert f"- {comparison['line']}" in text and (tmp_path / "results.md").read_text() == text


def test_demo_refuses_an_output_dir_that_is_a_file_in_one_line(tmp_path, capsys, monkeypatch):
    import eakd_llm.studies.demo as demo
    from eakd_llm.cli import main

    started = []
    monkeypatch.setattr(demo, "run_demo", lambda output_dir, **kwargs: started.append(output_dir))  # never the demo
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # demo_main sets it; restored after the test
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    for path in (target, target / "demo"):  # the file itself, or a folder that would have to be inside it
        assert main(["demo", "--quick", "--output-dir", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eakd-llm: error: --output-dir") and f"'{path}'" in err and err.count("\n") == 1
        assert "not a folder" in err
    assert started == [] and target.read_text() == "keep me"
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "new" / "demo")]) == 0  # a folder to be: accepted
    assert started == [str(tmp_path / "new" / "demo")] and capsys.readouterr().err == ""

"""The real-model study: fidelity metrics against hand computations, its decisions (teacher cache, recipe paths,
verdicts for a lower-is-better metric), and the whole study on the tiny stack with a mocked fetch."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eakd_llm.config.eakd_config import ConfigError
from eakd_llm.data.prompts import EvalRecord, load_eval_records
from eakd_llm.evaluation.fidelity import chat_examples, teacher_forced_scores, top1_agreement
from eakd_llm.loss.distillation import IGNORE_INDEX
from eakd_llm.models.loading import load_tokenizer
from eakd_llm.studies.real_study import plan_cache, recipe_config, run_study, select_prompts, study_main
from eakd_llm.studies.real_study_plan import PRESETS, PRUNED, TEACHER, StudyPlan
from eakd_llm.studies.real_study_report import compare

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "smollm2-135m_pruned"


def _by_hand(model, example) -> tuple[float, list[int]]:
    """CE per answer token and the argmax at each answer position, one unpadded example, plain torch."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    targets = torch.tensor(example["labels"][1:])
    keep = targets != IGNORE_INDEX
    log_probs = logits[keep].log_softmax(-1)
    ce = -log_probs[torch.arange(int(keep.sum())), targets[keep]].mean().item()
    return ce, logits[keep].argmax(-1).tolist()


def _kl_by_hand(teacher, student, example) -> float:
    """KL(T || S) per answer token over the whole vocabulary, float64, one unpadded example."""
    ids = torch.tensor([example["input_ids"]])
    keep = torch.tensor(example["labels"][1:]) != IGNORE_INDEX
    with torch.no_grad():
        log_t = teacher(input_ids=ids).logits[0, :-1][keep].double().log_softmax(-1)
        log_s = student(input_ids=ids).logits[0, :-1][keep].double().log_softmax(-1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def test_top1_agreement_by_hand():
    assert top1_agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 50.0
    assert top1_agreement([7], [7]) == 100.0
    with pytest.raises(ValueError, match="one length"):
        top1_agreement([1, 2], [1])


def test_teacher_forced_scores_match_a_hand_computation(tiny_stack):
    tokenizer = load_tokenizer(tiny_stack["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_stack["student"]).eval()
    records = [EvalRecord("q", ["a short answer"], [{"role": "user", "content": "Name a fruit."}]),
               EvalRecord("q", ["apple banana cherry, and a much longer answer than the first one"],
                          [{"role": "user", "content": "hello"}])]
    examples = chat_examples(records, tokenizer, 128, 96)
    assert len(examples[0]["input_ids"]) != len(examples[1]["input_ids"])  # one batch, padded
    reference = [_by_hand(teacher, e)[1] for e in examples]
    scores = teacher_forced_scores(student, examples, tokenizer.pad_token_id, batch_size=2, reference=reference,
                                   teacher=teacher)
    for example, score, ref in zip(examples, scores, reference):
        ce, argmax = _by_hand(student, example)
        assert score["ce"] == pytest.approx(ce, abs=1e-4)
        assert score["kl"] == pytest.approx(_kl_by_hand(teacher, student, example), abs=1e-5)
        assert score["argmax"] == argmax
        assert score["top1"] == pytest.approx(100.0 * np.mean([a == b for a, b in zip(argmax, ref)]))
    assert [s["top1"] for s in teacher_forced_scores(teacher, examples, tokenizer.pad_token_id,
                                                     reference=reference)] == [100.0, 100.0]


def _row(name, seed, ce, top1, tokens=None):
    return {"name": name, "seed": seed, "per_prompt": {"ce": ce, "kl": ce, "top1": top1, "rougeL": top1,
                                                       "stopped": [1.0], "tokens": tokens or [10] * len(ce)}}


def test_ce_and_top1_are_token_weighted_ratios_of_sums():
    """A 3-token answer weighs less than a 60-token one: the table's CE is sum(ce_p * n_p) / sum(n_p), and the
    paired difference is the difference of those ratios."""
    from eakd_llm.evaluation.fidelity import token_weighted
    from eakd_llm.studies.real_study_report import summarise

    tokens = [3, 60, 17]
    a = _row("a", 1, [4.0, 1.0, 2.0], [10.0, 90.0, 50.0], tokens)
    b = _row("b", 1, [1.0, 1.5, 2.5], [80.0, 60.0, 40.0], tokens)
    ratio = lambda v: sum(x * n for x, n in zip(v, tokens)) / sum(tokens)  # noqa: E731
    assert np.mean(token_weighted([4.0, 1.0, 2.0], tokens)) == pytest.approx(ratio([4.0, 1.0, 2.0]))
    assert summarise("a", [a])["ce"]["mean"] == pytest.approx(ratio([4.0, 1.0, 2.0]))  # 1.5, not 2.33
    assert summarise("a", [a])["top1"]["mean"] == pytest.approx(ratio([10.0, 90.0, 50.0]))
    assert summarise("a", [a])["rougeL"]["mean"] == pytest.approx(50.0)  # per prompt: a ROUGE-L per answer
    ce = compare("a", [a], "b", [b], "ce")
    assert ce["mean_diff"] == pytest.approx(ratio([4.0, 1.0, 2.0]) - ratio([1.0, 1.5, 2.5]))
    with pytest.raises(ValueError, match="3 values for 2 token counts"):
        token_weighted([1.0, 2.0, 3.0], [1, 2])


def test_verdicts_know_that_lower_ce_is_better():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, size=40)
    better = _row("a", 1, list(base - 0.5 + rng.normal(0, 0.01, 40)), list(base * 10 + 5))
    worse = _row("b", 1, list(base), list(base * 10))
    ce = compare("a", [better], "b", [worse], "ce")
    assert ce["mean_diff"] < 0 and ce["verdict"] == "better"
    assert compare("b", [worse], "a", [better], "ce")["verdict"] == "worse"
    top1 = compare("a", [better], "b", [worse], "top1")
    assert top1["mean_diff"] == pytest.approx(5.0) and top1["verdict"] == "better"
    assert "one training seed" in top1["method"]


def test_teacher_cache_pays_off_only_with_more_live_forwards_than_examples():
    kd = SimpleNamespace(kd_ratio=0.5, on_policy_fraction=0.0, seq_kd=False)
    sft = SimpleNamespace(kd_ratio=0.0, on_policy_fraction=0.0, seq_kd=False)
    on_policy = SimpleNamespace(kd_ratio=0.5, on_policy_fraction=0.5, seq_kd=False)
    plan = StudyPlan(steps=10, batch_size=4)
    configs = {"kd": kd, "sft": sft, "op": on_policy}
    decision = plan_cache(configs, plan, num_seeds=2, num_train=79)  # 1 cacheable run x 2 seeds x 10 x 4 = 80
    assert decision["use"] and decision["recipes"] == ["kd"] and decision["live_teacher_examples"] == 80
    assert not plan_cache(configs, plan, num_seeds=2, num_train=80)["use"]
    assert plan_cache(configs, StudyPlan(steps=1, batch_size=1, teacher_cache="on"), 1, 10**6)["use"]
    assert not plan_cache(configs, StudyPlan(teacher_cache="off"), 9, 1)["use"]
    assert not plan_cache({"sft": sft}, StudyPlan(teacher_cache="on"), 1, 1)["use"]


def test_recipe_paths_point_into_the_study_folder(tmp_path):
    for name in ("student-pruned", "teacher", "data"):
        (tmp_path / name).mkdir()
    config = recipe_config(RECIPES / "kd.yaml", tmp_path, {"output_dir": str(tmp_path / "out"), "max_steps": 3})
    assert config.model_name_or_path == str(tmp_path / "student-pruned")
    assert config.teacher_model_name_or_path == str(tmp_path / "teacher")
    assert config.dataset_name == str(tmp_path / "data") and config.max_steps == 3
    (tmp_path / "teacher").rmdir()  # a path that is not in the study folder is left as written (a hub id, say)
    assert recipe_config(RECIPES / "kd.yaml", tmp_path, {"output_dir": "o"}).teacher_model_name_or_path == "teacher"


def test_plans_and_prompt_selection():
    for plan in PRESETS.values():
        plan.validate()
    assert PRESETS["pilot"].max_length == 192 and PRESETS["pilot"].num_layers == 24
    with pytest.raises(ConfigError, match="--num-test must be >= 2"):
        StudyPlan(num_test=1).validate()
    with pytest.raises(ConfigError, match="cannot hold a prompt"):
        StudyPlan(max_length=100, max_prompt_length=64, max_new_tokens=64).validate()
    rows = [{"id": str(i), "split": s} for i, s in enumerate(["train", "test", "train", "test", "test", "train"])]
    chosen = select_prompts(rows, StudyPlan(num_train=2, num_test=2))
    assert [r["id"] for r in chosen] == ["0", "2", "1", "3"]
    with pytest.raises(ConfigError, match="1 test prompts"):
        select_prompts(rows[:2], StudyPlan())


TINY_PLAN = StudyPlan(num_train=8, num_test=4, steps=2, batch_size=2, num_layers=3, max_length=128,
                      max_prompt_length=96, max_new_tokens=8, calibration_samples=4, generation_batch_size=8,
                      eval_batch_size=4, teacher_cache="on", cache_top_k=16, system=None, keep_truncated=True)


def test_study_on_the_tiny_stack(tiny_stack, tmp_path, capsys):
    import shutil

    root = tmp_path / "study"
    fetched = []
    teacher_copy = tmp_path / "cache" / "teacher"
    shutil.copytree(tiny_stack["teacher"], teacher_copy)

    def fetch(cache: Path) -> Path:
        fetched.append(cache)
        return teacher_copy if cache == tmp_path / "cache" else cache / "teacher"

    recipes = RECIPES  # KD, raw EA-KD, normalised EA-KD at tau' 2, 1, 0.5, SFT; and the kd_scaled control
    plan = StudyPlan(**{**TINY_PLAN.__dict__, "mt_bench": True})  # MT-Bench: three questions of its format here
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [q, "And then?"]}) + "\n"
                                 for i, c, q in [(81, "writing", "Write a short poem about rain."),
                                                 (101, "reasoning", "Which is heavier, a kilo of iron or feathers?"),
                                                 (121, "coding", "Name a sorting algorithm."),
                                                 (141, "stem", "Explain this: " + "very " * 150 + "long.")]))
    results = run_study(str(recipes), str(root), plan, seeds=(1,), cache_dir=str(tmp_path / "cache"),
                        workers=1, fetch=fetch, mt_bench_file=str(questions))
    assert fetched == [tmp_path / "cache"] and (root / "teacher").resolve() == teacher_copy.resolve()
    # the data: the teacher's answers to the first prompts of each split, chat records
    train = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()]
    assert len(train) == 8 and len(test) == 4 and all(r["messages"][-1]["role"] == "assistant" for r in train)
    # the student: 4 -> 3 layers by block influence, calibrated on the training conversations
    pruned = json.loads((root / "student-pruned" / "prune.json").read_text())
    assert pruned["num_hidden_layers"] == 3 and pruned["method"] == "block-influence"
    calibration = json.loads((root / "student-pruned" / "block_influence.json").read_text())["calibration"]
    assert calibration["data"] == str(root / "data" / "train.jsonl") and calibration["sequences"] == 4
    # every model has a row; the KD recipes trained from the teacher cache, SFT without
    table = {row["name"]: row for row in results["table"]}
    assert list(table) == [TEACHER, PRUNED, "eakd_token", "eakd_token_normalized", "eakd_token_normalized_t05",
                           "eakd_token_normalized_t1", "kd", "sft", "kd_scaled"]
    assert table[TEACHER]["top1"]["mean"] == pytest.approx(100.0)
    assert table[TEACHER]["by_definition"] == ["kl", "top1", "rougeL"]
    # every KD row read a cache built with its own tau': two caches, none of the KD rows live
    caches = {c["entropy_temperature"]: c for c in results["teacher_cache"]["caches"]}
    assert sorted(caches) == [0.5, 1.0, 2.0] and caches[1.0]["recipes"] == ["eakd_token_normalized_t1"]
    tau = {"eakd_token_normalized_t1": 1.0, "eakd_token_normalized_t05": 0.5}
    for name in ("kd", "kd_scaled", "eakd_token", "eakd_token_normalized", *tau):
        folder = table[name]["teacher_cache"]
        assert folder and json.loads((root / folder / "manifest.json").read_text())["entropy_temperature"] == (
            tau.get(name, 2.0))
    # the control: KD scaled by the effective scale the same seed's raw EA-KD run measured
    rows_by = {(r["name"], r["seed"]): r for r in results["rows"]}
    scale = rows_by[("eakd_token", 1)]["ea_effective_scale"]
    assert scale > 1 and rows_by[("kd_scaled", 1)]["kd_scale"] == scale and rows_by[("kd", 1)]["kd_scale"] == 1.0
    assert table["kd_scaled"]["kd_scale"] == pytest.approx(scale)
    assert not table["sft"]["teacher_cache"]
    printed = capsys.readouterr().out
    assert "teacher source of eakd_token_normalized_t1: cache teacher-cache-k16-t1-e1-float32" in printed
    assert "teacher source of kd_scaled: cache teacher-cache-k16-t1-e2-float32" in printed
    assert str(root) not in (root / "results.json").read_text()  # paths relative to the study folder
    assert all(table[n]["seconds_per_step"] > 0 for n in ("kd", "sft"))
    rows = {(r["name"], r["seed"]): r for r in results["rows"]}
    assert all(len(r["per_prompt"]["ce"]) == 4 for r in rows.values())
    assert len(results["comparisons"]) == 9 * 4 and all(c["verdict"] for c in results["comparisons"])
    pairs = {c["name"] for c in results["comparisons"]}  # the tau' axis: tau' = 1 and 0.5 against 2
    assert {"eakd_token_normalized_t1 − eakd_token_normalized",
            "eakd_token_normalized_t05 − eakd_token_normalized"} <= pairs
    assert table[TEACHER]["kl"]["mean"] == 0.0 and table[PRUNED]["kl"]["mean"] > 0
    assert (root / "students" / "kd" / "seed-1" / "row.json").exists()
    # MT-Bench: the teacher answered its questions, every model is scored on them too, and nothing of it trained
    mt = results["sets"]["mt_bench"]
    assert mt["num_prompts"] == 3 and [r["name"] for r in mt["table"]] == [r["name"] for r in results["table"]]
    assert results["data"]["mt_bench"]["left_out"] == ["mtbench-141"]  # over the 96-token prompt budget
    assert len(mt["comparisons"]) == len(results["comparisons"])
    assert len((root / "students" / "kd" / "seed-1" / "answers-mtbench.jsonl").read_text().splitlines()) == 3
    trained_on = (root / "data" / "train.jsonl").read_text()
    assert "Write a short poem about rain." not in trained_on and "heavier, a kilo" not in trained_on
    assert ("Fidelity on 3 of MT-Bench's first-turn questions (never trained on; 1 left out, longer than the prompt "
            "budget)") in (root / "results.md").read_text()
    assert {"fetch", "generate_data", "prune", "teacher_reference", "teacher_cache", "runs"} <= set(results["timings"])
    text = (root / "results.md").read_text()
    assert "one training seed" in text and "| kd (teacher cache) |" in text
    assert len((root / "students" / "sft" / "seed-1" / "answers.jsonl").read_text().splitlines()) == 4

    # top-1 agreement of the untrained pruned student, recomputed by hand from the two models
    tokenizer = load_tokenizer(str(root / "student-pruned"))
    records = load_eval_records(str(root / "data" / "test.jsonl"), fmt="messages")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(root / "student-pruned").eval()
    by_hand = []
    for example in chat_examples(records, tokenizer, 128, 96):
        s_ce, s_argmax = _by_hand(student, example)
        agree = [a == b for a, b in zip(s_argmax, _by_hand(teacher, example)[1])]
        by_hand.append((s_ce, 100.0 * np.mean(agree), len(agree)))
    assert rows[(PRUNED, None)]["per_prompt"]["top1"] == pytest.approx([t for _, t, _ in by_hand])
    assert rows[(PRUNED, None)]["per_prompt"]["ce"] == pytest.approx([c for c, _, _ in by_hand], abs=1e-4)
    assert rows[(PRUNED, None)]["per_prompt"]["tokens"] == [n for _, _, n in by_hand]
    kl = [_kl_by_hand(teacher, student, e) for e in chat_examples(records, tokenizer, 128, 96)]
    assert rows[(PRUNED, None)]["per_prompt"]["kl"] == pytest.approx(kl, abs=1e-5)
    total = sum(n for _, _, n in by_hand)  # the table: token-weighted, a ratio of sums over the answers
    assert table[PRUNED]["ce"]["mean"] == pytest.approx(sum(c * n for c, _, n in by_hand) / total, abs=1e-4)
    assert table[PRUNED]["top1"]["mean"] == pytest.approx(sum(t * n for _, t, n in by_hand) / total)

    # a second run reuses everything, also with the teacher's cache folder moved (the same weights elsewhere)
    capsys.readouterr()
    moved = tmp_path / "moved-cache"
    shutil.move(str(tmp_path / "cache"), str(moved))
    again = run_study(str(recipes), str(root), plan, seeds=(1,), cache_dir=str(moved), workers=1, fetch=fetch)
    printed = capsys.readouterr().out
    assert "0 runs to do, 8 reused" in printed, [line for line in printed.splitlines() if "runs to do" in line]
    assert (root / "teacher").resolve() == (moved / "teacher").resolve()
    assert again["table"] == results["table"] and again["timings"]["runs"] == results["timings"]["runs"]
    # resume files damaged anyway (a kill mid-write of an older version, a full disk): recomputed, or named
    row = root / "students" / "eakd_token" / "seed-1" / "row.json"
    row.write_text(row.read_text()[:40])
    (root / "reference.json").write_text("{\"ids\": [")
    (root / "timings.json").write_text("{")
    capsys.readouterr()
    damaged = run_study(str(recipes), str(root), plan, seeds=(1,), cache_dir=str(moved), workers=1,
                        fetch=fetch)
    assert "2 runs to do, 6 reused" in capsys.readouterr().out  # the EA-KD run and the control that takes its scale
    assert json.loads(row.read_text())["name"] == "eakd_token" and damaged["table"][0] == results["table"][0]
    (root / "plan.json").write_text("{")
    with pytest.raises(ConfigError, match="plan.json is damaged"):
        run_study(str(recipes), str(root), plan, fetch=fetch)
    (root / "plan.json").unlink()
    run_study(str(recipes), str(root), plan, seeds=(1,), cache_dir=str(moved), workers=1, fetch=fetch)
    with pytest.raises(ConfigError, match="another plan \\(steps differ\\)"):
        run_study(str(recipes), str(root), StudyPlan(**{**plan.__dict__, "steps": 3}), fetch=fetch)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert study_main([str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "is not a folder of recipe .yaml files" in capsys.readouterr().err
    assert study_main([str(RECIPES), "--smoke", "--num-test", "1", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "eakd-llm: error: --num-test must be >= 2 (paired intervals need two prompts), got 1"
    (tmp_path / "file").write_text("x")
    assert study_main([str(RECIPES), "--output-dir", str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_top1_compares_both_models_over_the_tokenizers_tokens(tiny_stack, tmp_path):
    """A teacher whose output matrix has padding rows beyond its tokenizer (scaled copies of real rows, so they win
    the argmax at some positions) against a student without them: both argmaxes are taken over the tokenizer's
    tokens, so the original teacher, whose first rows are the padded one's, agrees with it everywhere."""
    import shutil

    from eakd_llm.studies.real_study import _reference, evaluate_folder

    root = tmp_path / "study"
    (root / "data").mkdir(parents=True)
    tokenizer = load_tokenizer(tiny_stack["teacher"])
    padded = AutoModelForCausalLM.from_pretrained(tiny_stack["teacher"])
    vocab = len(tokenizer)
    padded.resize_token_embeddings(vocab + 8, mean_resizing=False)
    head = padded.get_output_embeddings().weight
    with torch.no_grad():
        head[vocab:] = 3.0 * head[:8]
    padded.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    records = [{"messages": [{"role": "user", "content": f"Name a fruit number {i}."},
                             {"role": "assistant", "content": "apple banana cherry pear plum"}], "stopped": True}
               for i in range(3)]
    (root / "data" / "test.jsonl").write_text("".join(json.dumps({"id": str(i), **r}) + "\n"
                                                      for i, r in enumerate(records)))
    plan = StudyPlan(num_test=3, max_length=128, max_prompt_length=96, max_new_tokens=4, eval_batch_size=2,
                     system=None)
    reference = _reference(root, plan)
    assert reference["vocab_size"] == vocab and max(max(a) for a in reference["argmax"]) < vocab
    student = tmp_path / "original"
    shutil.copytree(tiny_stack["teacher"], student)
    scores = evaluate_folder(str(student), str(root), plan)
    assert scores["per_prompt"]["top1"] == [100.0] * 3


def test_flattening_step_by_hand():
    from eakd_llm.studies.real_study import flattening_step

    curve = [(50, 2.0), (100, 1.5), (150, 1.30), (200, 1.29), (250, 1.285), (300, 1.284)]
    assert flattening_step(curve, 0.01) == 200  # from 1.30 it still falls 1.2% (to 1.284), from 1.29 0.5%
    assert flattening_step(curve, 0.001) == 250
    assert flattening_step([(10, 3.0), (20, 2.0), (30, 1.0)], 0.01) is None  # still falling: train longer
    assert flattening_step([(10, 1.0), (20, 1.2), (30, 1.1)], 0.01) == 10  # it rose: flat (or worse) from the start


def test_learning_curve_on_the_tiny_stack(tiny_stack, tmp_path, capsys):
    """--learning-curve: the study's preparation, then one recipe trained with the validation answers' CE every
    --eval-every steps (held-out prompts of the prompt set's validation split, answered by the teacher)."""
    import shutil

    plan = StudyPlan(**{**TINY_PLAN.__dict__, "num_validation": 4, "steps": 4})
    root = tmp_path / "curve"
    recipes = tmp_path / "recipes"  # a recipe name with a dot: its outputs keep the whole name
    recipes.mkdir()
    shutil.copy(RECIPES / "kd.yaml", recipes / "kd_tau1.5.yaml")
    result = run_study(str(recipes), str(root), plan, seeds=(3,), workers=1, curve="kd_tau1.5", eval_every=2,
                       fetch=lambda cache: Path(tiny_stack["teacher"]))
    assert [step for step, _ in result["curve"]] == [2, 4] and all(ce > 0 for _, ce in result["curve"])
    validation = [json.loads(line) for line in (root / "data" / "validation.jsonl").read_text().splitlines()]
    assert len(validation) == 4
    assert (root / "learning-curve" / "kd_tau1.5-seed-3.png").stat().st_size > 0
    saved = json.loads((root / "learning-curve" / "kd_tau1.5-seed-3.json").read_text())
    assert saved["curve"] == [list(p) for p in result["curve"]] and saved["validation_answers"] == 4
    assert "| 4 |" in (root / "learning-curve" / "kd_tau1.5-seed-3.md").read_text()
    with pytest.raises(ConfigError, match="needs --num-validation >= 2"):
        run_study(str(RECIPES), str(tmp_path / "other"), TINY_PLAN, curve="kd", fetch=lambda c: c)
    with pytest.raises(ConfigError, match="'nope' is not a recipe"):
        run_study(str(RECIPES), str(tmp_path / "other"), plan, curve="nope", fetch=lambda c: c)


def test_recipes_selects_rows_of_the_folder_and_names_a_missing_one(tmp_path):
    from eakd_llm.studies.real_study import find_recipes

    for name in ("kd", "sft", "eakd_token"):
        (tmp_path / f"{name}.yaml").write_text("kd_ratio: 0.5\n")
    assert list(find_recipes(str(tmp_path))) == ["eakd_token", "kd", "sft"]
    assert list(find_recipes(str(tmp_path), ["sft", "kd"])) == ["kd", "sft"]
    with pytest.raises(ConfigError, match=r"--recipes kd_scaled, x: not in .*choose from: eakd_token, kd, sft"):
        find_recipes(str(tmp_path), ["kd_scaled", "kd", "x"])

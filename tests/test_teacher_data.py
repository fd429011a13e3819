"""``eakd-llm generate-data`` on the tiny stack: chat records per split equal to an independent ``generate`` call,
stopped/truncated per record, resuming keeps finished records and refuses other settings, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from eakd_llm.cli import main
from eakd_llm.data.instruction_prompts import generate_prompt_set
from eakd_llm.models.loading import load_tokenizer

SYSTEM = "Be brief."


def _prompt_file(path: Path, per_split: dict[str, int]) -> list[dict]:
    records = generate_prompt_set(0)
    chosen = [r for split, n in per_split.items() for r in [x for x in records if x["split"] == split][:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    return chosen


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _reference(folder: str, prompts: list[dict], budget: int, system: str | None) -> dict[str, dict]:
    """What generate-data must write, from transformers' own greedy ``generate``, one unpadded prompt at a time."""
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ends = model.generation_config.eos_token_id
    ends = list(ends) if isinstance(ends, (list, tuple)) else [ends]
    out = {}
    for record in prompts:
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        config = GenerationConfig(do_sample=False, max_new_tokens=budget, eos_token_id=ends,
                                  pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0,
                                                                                                       ids.shape[1]:]
        new = new.tolist()
        stopped = new[-1] in ends
        answer = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True).strip()
        out[record["id"]] = {"messages": turns + [{"role": "assistant", "content": answer}], "stopped": stopped,
                             "new_tokens": len(new)}
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return path, _prompt_file(path, {"train": 5, "validation": 1, "test": 3})


@pytest.fixture(scope="module")
def stopping_teacher(tiny_stack, prompts, tmp_path_factory) -> str:
    """The tiny teacher with one more end id: a token some of its greedy answers hold and others do not."""
    folder = tiny_stack["teacher"]
    plain = _reference(folder, prompts[1], 10, None)
    tokenizer = load_tokenizer(folder)
    rows = [tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"] for r in plain.values()]
    counts = {t: sum(t in row for row in rows) for row in rows for t in row}
    end = next(t for t, n in sorted(counts.items()) if 0 < n < len(rows))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    out = tmp_path_factory.mktemp("stopping-teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_records_are_chat_records_per_split_equal_to_generate(tiny_stack, prompts, tmp_path, capsys):
    path, chosen = prompts
    out = tmp_path / "data"
    assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out),
                 "--max-new-tokens", "6", "--batch-size", "3", "--system", SYSTEM, "--no-progress"]) == 0
    expected = _reference(tiny_stack["teacher"], chosen, 6, SYSTEM)
    for split in ("train", "validation", "test"):
        rows = _read(out / f"{split}.jsonl")
        assert [r["id"] for r in rows] == [r["id"] for r in chosen if r["split"] == split]  # prompt-file order
        for row in rows:
            family = next(r["family"] for r in chosen if r["id"] == row["id"])
            assert row == {"id": row["id"], "family": family, **expected[row["id"]]}
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["generation"]["max_new_tokens"] == 6 and settings["generation"]["system"] == SYSTEM
    assert settings["teacher"] == str(Path(tiny_stack["teacher"]).resolve()) and len(settings["prompts_sha256"]) == 64
    assert "train: 5 records" in capsys.readouterr().out


def test_stopped_and_truncated_are_recorded_per_record(stopping_teacher, prompts, tmp_path):
    path, chosen = prompts
    out = tmp_path / "data"
    assert main(["generate-data", stopping_teacher, "--prompts", str(path), "--output", str(out),
                 "--max-new-tokens", "10", "--batch-size", "4", "--no-progress"]) == 0
    expected = _reference(stopping_teacher, chosen, 10, None)
    assert {e["stopped"] for e in expected.values()} == {True, False}
    logged = {r["id"]: r for r in _read(out / "generations.jsonl")}
    for id_, want in expected.items():
        assert {k: logged[id_][k] for k in want} == want
        assert want["stopped"] or want["new_tokens"] == 10  # truncated: the budget ran out
    # --drop-truncated leaves truncated answers out of the split files only
    dropped = tmp_path / "dropped"
    assert main(["generate-data", stopping_teacher, "--prompts", str(path), "--output", str(dropped),
                 "--max-new-tokens", "10", "--drop-truncated", "--no-progress"]) == 0
    kept = [r["id"] for split in ("train", "validation", "test") if (dropped / f"{split}.jsonl").exists()
            for r in _read(dropped / f"{split}.jsonl")]
    assert kept == [r["id"] for r in chosen if expected[r["id"]]["stopped"]]
    assert len(_read(dropped / "generations.jsonl")) == len(chosen)
    summary = json.loads((dropped / "summary.json").read_text())
    assert sum(e["dropped"] for e in summary["splits"].values()) == sum(not e["stopped"] for e in expected.values())


def test_resume_keeps_finished_records_and_refuses_other_settings(tiny_stack, prompts, tmp_path, capsys):
    path, chosen = prompts
    out = tmp_path / "data"
    args = ["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out), "--max-new-tokens",
            "5", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    log = out / "generations.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    first["messages"][-1]["content"] = "KEPT"  # a finished record is kept as it is, not generated again
    log.write_text("\n".join([json.dumps(first), lines[1], lines[2][:15]]))  # an interrupted append: a torn line
    capsys.readouterr()
    assert main(args[:-2] + ["3", "--no-progress"]) == 0  # another batch size may resume
    assert f"{len(chosen) - 2} answers generated, 2 reused" in capsys.readouterr().out
    rows = {r["id"]: r for split in ("train", "validation", "test") for r in _read(out / f"{split}.jsonl")}
    assert rows[first["id"]]["messages"][-1]["content"] == "KEPT"
    assert len(rows) == len(chosen) and len(_read(log)) == len(chosen)

    assert main(args[:7] + ["6", "--no-progress"]) == 2  # another budget
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (generation.max_new_tokens differ)" in err
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text() + json.dumps({"id": "extra", "prompt": "Name a color."}) + "\n")
    assert main(args[:2] + ["--prompts", str(other)] + args[4:]) == 2
    assert "prompts_sha256 differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (['{"id": "a", "prompt": "Hi."}', '{"id": "a", "prompt": "Ho."}'], [],
         "id 'a' was already used on line 1; ids must be unique"),
        (['{"id": "a", "prompt": "Hi.", "split": "dev"}'], [],
         "split='dev' is not allowed; choose one of: train, validation, test"),
        (['{"id": "a"}'], [], "no 'prompt' field"),
        (['{"id": "a", "prompt": "  "}'], [], "prompt must be a non-empty string"),
        (['{"id": "a", "prompt": "Hi."', ], [], "not valid JSON"),
        ([], [], "holds no prompt"),
        (['{"id": "a", "prompt": "' + "word " * 80 + '"}'], ["--max-prompt-length", "40"],
         "prompt 'a' is"),
        (['{"id": "a", "prompt": "Hi."}'], ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (['{"id": "a", "prompt": "Hi."}'], ["--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_bad_inputs_are_one_line_errors(tiny_stack, tmp_path, capsys, lines, extra, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "out"
    assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eakd-llm: error: ") and err.count("\n") == 0 and message in err
    assert not out.exists()  # refused before anything was written


def test_missing_file_and_a_foreign_output_folder(tiny_stack, prompts, tmp_path, capsys):
    path, _ = prompts
    assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "is not a file" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(foreign)]) == 2
    assert "is not empty and holds no settings.json" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_records_train_and_evaluate(tiny_stack, prompts, tmp_path):
    from eakd_llm.config.eakd_config import EAKDConfig
    from eakd_llm.data.dataset import build_dataset, load_split
    from eakd_llm.data.prompts import load_eval_records

    path, _ = prompts
    out = tmp_path / "data"
    assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out),
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    config = EAKDConfig(output_dir=str(tmp_path / "run"), dataset_name=str(out), dataset_format="messages",
                        max_length=128, max_prompt_length=96)
    tokenizer = load_tokenizer(tiny_stack["teacher"])
    train = build_dataset(load_split(str(out), "train"), config, tokenizer, split="train")
    assert len(train) == 5
    records = load_eval_records(str(out / "test.jsonl"), fmt="messages")
    rows = _read(out / "test.jsonl")
    assert [r.references for r in records] == [[row["messages"][-1]["content"]] for row in rows]
    assert [r.messages for r in records] == [row["messages"][:-1] for row in rows]


def test_resume_reads_records_holding_unicode_line_separators(tiny_stack, tmp_path, capsys):
    """U+2028, U+2029 and U+0085 are written raw (ensure_ascii=False); records end at "\\n" alone, so a resume reads
    them back instead of calling the folder damaged."""
    path = tmp_path / "prompts.jsonl"
    texts = ["Split\u2028here.", "Para\u2029graph.", "Next\u0085line."]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "data"
    args = ["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out),
            "--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    raw = (out / "generations.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in raw and "\u2029" in raw and "\u0085" in raw  # the characters really are in the file
    capsys.readouterr()
    assert main(args) == 0
    assert "0 answers generated, 3 reused" in capsys.readouterr().out


def test_a_record_torn_before_its_newline_is_generated_again_not_glued(tiny_stack, prompts, tmp_path, capsys):
    """An append interrupted just before its newline leaves a line that parses; without the newline the next append
    would be glued to it. It is cut and generated again, and every line of the log is one record."""
    path, chosen = prompts
    out = tmp_path / "data"
    args = ["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out),
            "--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    log = out / "generations.jsonl"
    lines = log.read_text(encoding="utf-8").split("\n")[:3]
    log.write_text("\n".join(lines), encoding="utf-8")  # two records whole, the third without its newline
    capsys.readouterr()
    assert main(args) == 0
    assert f"{len(chosen) - 2} answers generated, 2 reused" in capsys.readouterr().out
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").split("\n") if line]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in chosen)


def test_resume_refuses_a_dtype_device_or_tokenizer_that_changes_the_answers(tiny_stack, prompts, tmp_path, capsys):
    """settings.json binds what changes the answers besides the weights: the dtype, the device type, the tokenizer's
    chat template and the end ids of generation_config.json; each change is refused in one line naming it."""
    import shutil

    path, _ = prompts
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_stack["teacher"], teacher)
    out = tmp_path / "data"
    args = ["generate-data", str(teacher), "--prompts", str(path), "--output", str(out), "--max-new-tokens", "3",
            "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()

    def refused(extra: list[str], key: str) -> None:
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"other settings ({key} differ)" in err

    refused(["--dtype", "bfloat16"], "dtype")
    refused(["--device", "meta"], "device")
    config = json.loads((teacher / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 7] if isinstance(config["eos_token_id"], int) else [7]
    (teacher / "generation_config.json").write_text(json.dumps(config))
    refused([], "tokenizer.end_ids")
    shutil.copy(Path(tiny_stack["teacher"]) / "generation_config.json", teacher / "generation_config.json")
    template = teacher / "chat_template.jinja"
    template.write_text(template.read_text().replace("\n", " \n", 1))
    refused([], "tokenizer.chat_template_sha256")


def test_a_moved_teacher_resumes_and_a_changed_one_is_refused(tiny_stack, prompts, tmp_path, capsys):
    """The folder is bound to the teacher's weights, not its path: the same weights moved elsewhere resume; the
    weights changed in place are refused."""
    import shutil

    path, chosen = prompts
    teacher = tmp_path / "a" / "teacher"
    shutil.copytree(tiny_stack["teacher"], teacher)
    out = tmp_path / "data"
    args = ["--prompts", str(path), "--output", str(out), "--max-new-tokens", "3", "--no-progress"]
    assert main(["generate-data", str(teacher), *args]) == 0
    moved = tmp_path / "b" / "teacher"
    shutil.move(str(teacher.parent), str(moved.parent))
    capsys.readouterr()
    assert main(["generate-data", str(moved), *args]) == 0
    assert f"0 answers generated, {len(chosen)} reused" in capsys.readouterr().out
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert main(["generate-data", str(moved), *args]) == 2
    assert "other settings (teacher_fingerprint differ)" in capsys.readouterr().err


def test_sampled_answers_do_not_depend_on_the_batch_or_an_interruption(tiny_stack, prompts, tmp_path, capsys):
    """Sampling is seeded per prompt: batch sizes 1 and 4, and a run interrupted after its first batch and resumed,
    give every prompt the same answer; another seed gives other answers."""
    path, chosen = prompts

    def answers(folder: str, *extra: str) -> dict[str, str]:
        out = tmp_path / folder
        assert main(["generate-data", tiny_stack["teacher"], "--prompts", str(path), "--output", str(out),
                     "--max-new-tokens", "8", "--temperature", "1.0", "--no-progress", *extra]) == 0
        return {r["id"]: r["messages"][-1]["content"] for r in _read(out / "generations.jsonl")}

    one = answers("one", "--batch-size", "1")
    four = answers("four", "--batch-size", "4")
    assert one == four and len(one) == len(chosen)
    log = tmp_path / "four" / "generations.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().split("\n")[:3]))  # killed after 3 answers
    assert answers("four", "--batch-size", "4") == one
    other = answers("other", "--batch-size", "4", "--seed", "1")
    assert sum(other[k] != one[k] for k in one) >= len(one) // 2


def test_a_hub_teachers_first_answers_are_bound_to_its_weights(tiny_stack, prompts, tmp_path, monkeypatch, capsys):
    """A hub id whose weights are not downloaded yet: generate-data fingerprints them after loading (downloading)
    the teacher, so a second run resumes instead of refusing the folder as made from other weights."""
    from hub_helpers import hub_teacher_arriving_on_load

    path, chosen = prompts
    repo = hub_teacher_arriving_on_load(monkeypatch, tiny_stack["teacher"], tmp_path / "hub")
    args = ["generate-data", repo, "--prompts", str(path), "--output", str(tmp_path / "data"), "--max-new-tokens",
            "3", "--no-progress"]
    assert main(args) == 0
    settings = json.loads((tmp_path / "data" / "settings.json").read_text())
    assert settings["teacher_fingerprint"] is not None
    capsys.readouterr()
    assert main(args) == 0
    assert f"0 answers generated, {len(chosen)} reused" in capsys.readouterr().out


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0),
                                                              (0.5, 7, 0.8)])
def test_the_per_prompt_sampler_draws_from_the_warped_distribution(temperature, top_k, top_p):
    """transformers runs a caller's processors before its temperature / top-k / top-p warpers, so the per-prompt
    sampler applies them itself: its distribution equals transformers' own warpers applied to the same scores."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from eakd_llm.models.generation import GenerationSettings, _RowSampler

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    settings = GenerationSettings(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = _RowSampler([torch.Generator().manual_seed(i) for i in range(4)], settings)
    reference = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1:
        reference = TopPLogitsWarper(top_p)(None, reference)
    torch.testing.assert_close(sampler.probs(scores), reference.softmax(-1))
    chosen = sampler(None, scores).argmax(-1)  # one possible token per row, inside the warped support
    assert all(reference.softmax(-1)[row, token] > 0 for row, token in enumerate(chosen.tolist()))

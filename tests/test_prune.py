"""Depth pruning: pruned checkpoints equal the original run through the kept layers only, on every architecture."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from eakd_llm import cli
from eakd_llm.config.eakd_config import ConfigError
from eakd_llm.models.prune import (
    PRUNE_FILE,
    SCORES_FILE,
    block_influence,
    calibration_batches,
    calibration_sequences,
    check_keep,
    check_rebuildable,
    keep_highest,
    prune_layers,
    uniform_keep,
)

VOCAB = 64
WINDOW = 4  # shorter than the test sequences, so sliding-window layers see a different mask than full ones
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (model class, config): sliding windows and per-layer types chosen so that kept layers mix the kinds.
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=3, tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True,
                                                    sliding_window=WINDOW, max_window_layers=2)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**COMMON, sliding_window=WINDOW)),
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW,
                                                       query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                                                       attn_logit_softcapping=10.0)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "full_attention"])),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**COMMON)),
}
KEEP = [0, 2, 3, 5]


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    model_class, make_config = ARCHITECTURES[name]
    config = make_config()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): randomise them so every weight matters
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.normal_(0.0, 0.3).add_(0.0 if name.startswith("gemma") else 1.0)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding in the second row
    input_ids[1, 7:] = 0
    return input_ids, attention_mask


def _layer_kinds(config) -> list[str]:
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def _mask(attention_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal, padding keys hidden, and keys within ``window`` of the query if given."""
    length = attention_mask.shape[1]
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    allowed = (key <= query) & attention_mask.bool()[:, None, None, :]
    if window is not None:
        allowed &= query - key < window
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def reference_forward(model: nn.Module, keep, input_ids, attention_mask, record=None) -> torch.Tensor:
    """Logits of the UNPRUNED ``model`` run through the layers ``keep`` only, by hand: embeddings, the kept original
    layer modules in order (each with its own original mask kind and rotary embedding), final norm, head, softcap.
    ``record`` collects each run layer's (input, output) hidden states."""
    inner, config = model.model, model.config
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    kinds = _layer_kinds(config)
    for index in keep:
        kind = kinds[index]
        mask = _mask(attention_mask, config.sliding_window if kind == "sliding_attention" else None)
        if isinstance(model, Gemma3ForCausalLM):
            rotary = inner.rotary_emb(hidden, position_ids, kind)
        else:
            rotary = inner.rotary_emb(hidden, position_ids)
        out = inner.layers[index](hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
        out = out[0] if isinstance(out, tuple) else out
        if record is not None:
            record.append((hidden, out))
        hidden = out
    logits = model.lm_head(inner.norm(hidden))
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# Gemma3 keeping sliding-window layers only: the pruned config has one layer kind (one rotary embedding on reload).
@pytest.mark.parametrize("name, keep", [(name, KEEP) for name in ARCHITECTURES] + [("gemma3", [0, 2, 4])])
def test_pruned_checkpoint_equals_the_original_through_the_kept_layers(name, keep, tmp_path):
    original = tiny_model(name)
    input_ids, attention_mask = inputs()
    with torch.no_grad():
        full = original(input_ids=input_ids, attention_mask=attention_mask).logits
    # The hand-written reference reproduces the unpruned model, so it is a faithful stand-in for "the kept layers".
    torch.testing.assert_close(reference_forward(original, range(6), input_ids, attention_mask), full)
    expected = reference_forward(original, keep, input_ids, attention_mask)
    assert not torch.allclose(expected, full, atol=1e-3)  # dropping layers changes the output

    original_config = original.config.to_dict()
    pruned = prune_layers(copy.deepcopy(original), keep)
    assert original.config.to_dict() == original_config
    assert pruned.config.num_hidden_layers == len(keep)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(len(keep)))
    if original.config.to_dict().get("layer_types"):
        assert pruned.config.layer_types == [original.config.layer_types[i] for i in keep]
    if name.startswith("qwen"):  # max_window_layers still derives the same layer kinds
        derived = type(pruned.config)(**{**pruned.config.to_dict(), "layer_types": None})
        assert derived.layer_types == pruned.config.layer_types
        assert len(set(derived.layer_types)) == 2
    check_rebuildable(pruned)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=input_ids, attention_mask=attention_mask).logits, expected)

    pruned.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(original)
    assert reloaded.config.num_hidden_layers == len(keep)
    if original.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    else:
        assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits, expected)


def _incremental_logits(model: nn.Module, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of positions prefix-1.. computed one token at a time through the KV cache."""
    with torch.no_grad():
        out = model(input_ids=input_ids[:, :prefix], use_cache=True)
        logits, cache = [out.logits[:, -1]], out.cache
        for position in range(prefix, input_ids.shape[1]):
            out = model(input_ids=input_ids[:, position:position + 1], cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            cache = out.cache
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("name", ["qwen2", "gemma3", "mistral"])
def test_generation_with_a_kv_cache_after_pruning(name, tmp_path):
    pruned = prune_layers(tiny_model(name), [1, 3, 4])
    pruned.generation_config.pad_token_id = 0
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    # Teacher-forced: each cached step equals the full forward (windows of 4 < 12 tokens, so cache kinds matter).
    sequence = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = pruned(input_ids=sequence, use_cache=False).logits[:, 4:]
    torch.testing.assert_close(_incremental_logits(pruned, sequence, 5), full, atol=1e-5, rtol=1e-5)

    settings = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        cached = pruned.generate(prompt, use_cache=True, **settings)
        uncached = pruned.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(prompt, use_cache=True, **settings), cached)


def test_block_influence_matches_a_hand_computation():
    model = tiny_model("gemma2")
    input_ids, attention_mask = inputs()
    record: list[tuple[torch.Tensor, torch.Tensor]] = []
    reference_forward(model, range(6), input_ids, attention_mask, record)
    expected = []
    real = attention_mask.bool()
    for h_in, h_out in record:
        x, y = h_in[real].double(), h_out[real].double()  # [tokens, H], padding left out
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        expected.append(1.0 - cos.mean().item())
    # Two batches (rows split) accumulate over tokens, not over batch means.
    batches = [{"input_ids": input_ids[i:i + 1], "attention_mask": attention_mask[i:i + 1]} for i in range(2)]
    scores = block_influence(model, batches)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 6  # the layers really differ
    assert block_influence(model, [{"input_ids": input_ids, "attention_mask": attention_mask}]) == pytest.approx(
        expected, abs=1e-5)


def test_keep_sets():
    assert uniform_keep(6, 4) == [0, 2, 3, 5]
    assert uniform_keep(32, 16) == [round(i * 31 / 15 + 1e-9) for i in range(16)]
    assert uniform_keep(8, 8) == list(range(8))
    assert uniform_keep(5, 2) == [0, 4]
    assert uniform_keep(5, 1) == [0]
    for layers in range(1, 40):
        for n in range(1, layers + 1):
            keep = uniform_keep(layers, n)
            assert len(keep) == n and keep == sorted(set(keep)) and keep[0] == 0
            assert n == 1 or keep[-1] == layers - 1
    assert keep_highest([0.3, 0.1, 0.5, 0.1, 0.2], 3) == [0, 2, 4]
    assert keep_highest([0.2, 0.1, 0.1, 0.3], 3) == [0, 1, 3]  # tie between 1 and 2: the earlier layer is kept


@pytest.mark.parametrize("keep, message", [
    ([], "empty"),
    ([0, 6], "out of range"),
    ([-1, 2], "out of range"),
    ([0, 2, 2], "more than once"),
    ([3, 1], "increasing order"),
])
def test_bad_keep_sets_are_refused(keep, message):
    with pytest.raises(ConfigError, match=message):
        check_keep(keep, 6)
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=message):
        prune_layers(model, keep)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6


def test_other_layouts_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="model.model.layers"):
        prune_layers(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)), [0])


def test_an_index_dependent_architecture_is_refused():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 4}, decoder_sparse_step=2, num_experts=2,
                            num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    # Layers 1 and 3 are MoE (every decoder_sparse_step-th): kept as [1, 2], the MoE layer would be rebuilt dense at
    # position 0; kept as [0, 1], the dense/MoE pattern is the one the config rebuilds, which is fine.
    model = prune_layers(Qwen2MoeForCausalLM(config), [1, 2])
    with pytest.raises(ConfigError, match="'model.layers.0.mlp.*depend on their index"):
        check_rebuildable(model)
    check_rebuildable(prune_layers(Qwen2MoeForCausalLM(config), [0, 1]))


# ----------------------------------------------------------------------------------------------------------------
# Calibration data and the command line (the tiny stack's 4-layer Llama teacher, tokenizer and instruction data)
# ----------------------------------------------------------------------------------------------------------------


def _recipe(tiny_stack, tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model_name_or_path: {tiny_stack['student']}\nkd_ratio: 0\n"
                    f"dataset_name: {tiny_stack['data_dir']}\ndataset_format: instruction\n"
                    "response_column: output\nmax_length: 64\n"
                    f"output_dir: {tmp_path / 'unused'}\nreport_to: none\n")
    return str(path)


def _prune(*args: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["prune", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _load_eager(path: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_cli_block_influence_from_a_recipe(tiny_stack, tmp_path, capsys):
    from transformers import AutoTokenizer

    from eakd_llm.config.recipe import load_recipe

    recipe, out = _recipe(tiny_stack, tmp_path), tmp_path / "pruned"
    code, printed, err = _prune(tiny_stack["teacher"], "--output", str(out), "--num-layers", "2", "--recipe", recipe,
                                "--calibration-samples", "12", "--max-length", "48", "--batch-size", "5",
                                capsys=capsys)
    assert code == 0, err
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", PRUNE_FILE,
                 SCORES_FILE):
        assert (out / name).is_file(), name
    scores_file = json.loads((out / SCORES_FILE).read_text())
    provenance = json.loads((out / PRUNE_FILE).read_text())
    scores, kept = scores_file["scores"], scores_file["kept_layers"]
    assert len(scores) == 4 and kept == keep_highest(scores, 2) == provenance["kept_layers"]
    assert scores_file["dropped_layers"] == provenance["dropped_layers"] == [i for i in range(4) if i not in kept]
    assert max(scores[i] for i in scores_file["dropped_layers"]) <= min(scores[i] for i in kept)
    assert scores_file["calibration"]["sequences"] == 12 and scores_file["calibration"]["seed"] == 0
    assert provenance["source"] == tiny_stack["teacher"] and provenance["source_num_hidden_layers"] == 4
    assert provenance["method"] == "block-influence" and provenance["scores_file"] == SCORES_FILE
    for index, score in enumerate(scores):
        assert f"{index:>5}  {score:>15.6f}" in printed

    # The scores are block_influence over the recipe's first 12 shuffled records, each cut to 48 tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_stack["teacher"])
    original = _load_eager(tiny_stack["teacher"])
    sequences = calibration_sequences(tokenizer, recipe=load_recipe(recipe), num_samples=12, max_length=48, seed=0)
    assert len(sequences) == 12 and max(len(s) for s in sequences) == 48  # the recipe allows 64: cut to 48
    assert all(s[0] == tokenizer.bos_token_id for s in sequences)
    assert "### Instruction:" in tokenizer.decode(sequences[0])
    batches = calibration_batches(sequences, 5, tokenizer.pad_token_id)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]
    assert scores == pytest.approx(block_influence(original, batches), abs=1e-6)
    other_draw = calibration_sequences(tokenizer, recipe=load_recipe(recipe), num_samples=12, max_length=48, seed=1)
    assert other_draw != sequences

    pruned = _load_eager(str(out))
    assert pruned.config.num_hidden_layers == 2
    assert pruned.generation_config.eos_token_id == original.generation_config.eos_token_id
    saved_tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = "### Instruction:\nName a fruit.\n\n### Response:\n"
    assert saved_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert saved_tokenizer.chat_template == tokenizer.chat_template and saved_tokenizer.pad_token == tokenizer.pad_token
    input_ids, attention_mask = torch.tensor([sequences[0][:20]]), torch.ones(1, 20, dtype=torch.long)
    with torch.no_grad():
        logits = pruned(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, reference_forward(original, kept, input_ids, attention_mask))


def test_plain_text_calibration(tiny_stack, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_stack["teacher"])
    texts = ["The cat sleeps in the garden.", "Name a fruit: apple", "A quiet river runs near the old castle " * 5]
    (tmp_path / "calib.txt").write_text("\n".join(texts[:2]) + "\n\n" + texts[2] + "\n")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    expected = sorted(tokenizer(t)["input_ids"][:16] for t in texts)
    for name in ("calib.txt", "calib.jsonl"):
        sequences = calibration_sequences(tokenizer, data=str(tmp_path / name), num_samples=10, max_length=16)
        assert sorted(sequences) == expected
    assert len(calibration_sequences(tokenizer, data=str(tmp_path / "calib.txt"), num_samples=2, max_length=16)) == 2

    out = tmp_path / "pruned"
    code, _, err = _prune(tiny_stack["teacher"], "--output", str(out), "--num-layers", "3", "--calibration-data",
                          str(tmp_path / "calib.jsonl"), capsys=capsys)
    assert code == 0, err
    calibration = json.loads((out / SCORES_FILE).read_text())["calibration"]
    assert calibration["sequences"] == 3 and calibration["data"] == str(tmp_path / "calib.jsonl")


def test_cli_explicit_and_uniform_layers(tiny_stack, tmp_path, capsys):
    original = _load_eager(tiny_stack["teacher"])
    input_ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    for args, kept, method in ((["--layers", "1,3"], [1, 3], "layers"),
                               (["--num-layers", "3", "--method", "uniform"], [0, 2, 3], "uniform")):
        out = tmp_path / method
        code, printed, err = _prune(tiny_stack["teacher"], "--output", str(out), *args, capsys=capsys)
        assert code == 0, err
        assert f"kept layers {kept} of 4" in printed
        provenance = json.loads((out / PRUNE_FILE).read_text())
        assert provenance["kept_layers"] == kept and provenance["method"] == method
        assert provenance["scores_file"] is None and not (out / SCORES_FILE).exists()
        with torch.no_grad():
            logits = _load_eager(str(out))(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(logits, reference_forward(original, kept, input_ids, attention_mask))

    # --overwrite replaces a previous pruned folder entirely (no stale scores file left behind).
    scored = tmp_path / "scored"
    (tmp_path / "c.txt").write_text("one two three\nfour five six\n")
    assert _prune(tiny_stack["teacher"], "--output", str(scored), "--num-layers", "2", "--calibration-data",
                  str(tmp_path / "c.txt"), capsys=capsys)[0] == 0
    assert (scored / SCORES_FILE).is_file()
    assert _prune(tiny_stack["teacher"], "--output", str(scored), "--layers", "0", "--overwrite", capsys=capsys)[0] == 0
    assert not (scored / SCORES_FILE).exists()
    assert json.loads((scored / "config.json").read_text())["num_hidden_layers"] == 1


def test_cli_refusals(tiny_stack, tmp_path, capsys):
    teacher = tiny_stack["teacher"]
    (tmp_path / "calib.txt").write_text("some calibration text\n")
    calib = ["--calibration-data", str(tmp_path / "calib.txt")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    no_tokenizer = tmp_path / "no_tokenizer"
    AutoModelForCausalLM.from_pretrained(teacher).save_pretrained(no_tokenizer)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    out = str(tmp_path / "out")
    capsys.readouterr()  # the loading progress above is not the command's output
    cases = [
        ([teacher, "--output", out, "--layers", "0,1", "--num-layers", "2"], "exactly one of --layers"),
        ([teacher, "--output", out], "exactly one of --layers"),
        ([teacher, "--output", out, "--num-layers", "0"], "--num-layers must be >= 1"),
        ([teacher, "--output", out, "--num-layers", "5", *calib], r"--num-layers must be in \[1, 4\]"),
        ([teacher, "--output", out, "--num-layers", "5", "--method", "uniform"], r"must be in \[1, 4\]"),
        ([teacher, "--output", out, "--layers", "0,0"], "more than once"),
        ([teacher, "--output", out, "--layers", "3,1"], "increasing order"),
        ([teacher, "--output", out, "--layers", "0,4"], "out of range"),
        ([teacher, "--output", out, "--layers", "0,x"], "comma-separated layer indices"),
        ([teacher, "--output", out, "--layers", "0", "--method", "uniform"], "--layers already names them"),
        ([teacher, "--output", out, "--num-layers", "2", "--method", "uniform", *calib], "block-influence only"),
        ([teacher, "--output", out, "--num-layers", "2", *calib, "--max-length", "1"], "--max-length must be >= 2"),
        ([teacher, "--output", str(tmp_path / "full"), "--layers", "0"], "pass --overwrite"),
        ([teacher, "--output", str(tmp_path / "full"), "--layers", "0", "--overwrite"], "holds no model"),
        ([teacher, "--output", teacher, "--layers", "0", "--overwrite"], "the model folder being pruned"),
        ([str(no_tokenizer), "--output", out, "--num-layers", "2", *calib], "has no tokenizer"),
        ([teacher, "--output", out, "--num-layers", "2", "--calibration-data", str(tmp_path / "nope.jsonl")],
         "does not exist"),
        ([str(tmp_path / "nope"), "--output", out, "--layers", "0"], "does not exist"),
        ([str(tmp_path / "gpt2"), "--output", out, "--layers", "0"], "GPT2LMHeadModel.*model.model.layers"),
        ([teacher, "--output", out, "--num-layers", "2", *calib, "--device", "bogus"], "is not a device"),
    ]
    for args, message in cases:
        code, _, err = _prune(*args, capsys=capsys)
        assert code == 2, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eakd-llm: error: "), (args, err)
        assert re.search(message, lines[0]), (args, lines[0])
        assert "Loading weights" not in err, (args, err)  # refused before any weight was loaded
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_block_influence_defaults_to_the_bundled_prompt_set(tiny_stack, tmp_path, capsys):
    """With no --calibration-data or --recipe (the first command a new user tries after fetch-model), block influence
    calibrates on the bundled instruction prompts' training split, rendered with the model's chat template; the
    output names the set, block_influence.json records it, and the scores are those of exactly those sequences."""
    from transformers import AutoTokenizer

    from eakd_llm.data.instruction_prompts import generate_prompt_set
    from eakd_llm.models.prune import BUNDLED_CALIBRATION, bundled_calibration_sequences

    out = tmp_path / "pruned"
    code, printed, err = _prune(tiny_stack["teacher"], "--output", str(out), "--num-layers", "3",
                                "--calibration-samples", "6", "--max-length", "200", capsys=capsys)
    assert code == 0, err
    assert "calibration: 6 prompts of the bundled instruction prompt set" in printed
    record = json.loads((out / SCORES_FILE).read_text())
    assert record["calibration"]["data"] == BUNDLED_CALIBRATION and record["calibration"]["sequences"] == 6
    assert record["calibration"]["rendering"] == "chat template"
    tokenizer = AutoTokenizer.from_pretrained(tiny_stack["teacher"])
    sequences, _ = bundled_calibration_sequences(tokenizer, 6, 200, seed=0)
    train_prompts = [r["prompt"] for r in generate_prompt_set(0) if r["split"] == "train"]
    for sequence in sequences:  # a training prompt as the template's user turn, ending in the generation prompt
        text = tokenizer.decode(sequence)
        assert any(f"<|user|>\n{prompt}" in text for prompt in train_prompts)
        assert text.endswith("<|assistant|>\n")
    batches = calibration_batches(sequences, 8, tokenizer.pad_token_id)
    assert record["scores"] == pytest.approx(block_influence(_load_eager(tiny_stack["teacher"]), batches), abs=1e-6)

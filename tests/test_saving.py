"""The final save: a loadable model or adapter plus tokenizer in output_dir under every launch mode, or a loud error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eakd_llm.models.sharding import SaveError, check_saved_model, save_final_model


def _saved(tiny_stack, folder, tokenizer: bool = True):
    AutoModelForCausalLM.from_pretrained(tiny_stack["student"]).save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(tiny_stack["student"]).save_pretrained(folder)
    return folder


def test_a_saved_model_passes_and_missing_pieces_are_named(tiny_stack, tmp_path):
    check_saved_model(str(_saved(tiny_stack, tmp_path / "ok")), adapter=False)
    with pytest.raises(SaveError, match="no tokenizer files"):
        check_saved_model(str(_saved(tiny_stack, tmp_path / "no-tok", tokenizer=False)), adapter=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SaveError, match="no model.safetensors or .* no config.json; no tokenizer files"):
        check_saved_model(str(empty), adapter=False)
    with pytest.raises(SaveError, match="no adapter_model.safetensors or adapter_model.bin; no adapter_config.json"):
        check_saved_model(str(_saved(tiny_stack, tmp_path / "full")), adapter=True)
    broken = _saved(tiny_stack, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SaveError, match="model.safetensors is unreadable"):
        check_saved_model(str(broken), adapter=False)
    zero3 = tmp_path / "zero3"
    (zero3 / "global_step8").mkdir(parents=True)
    (zero3 / "config.json").write_text("{}")
    with pytest.raises(SaveError, match="zero3_save_16bit_model: true"):
        check_saved_model(str(zero3), adapter=False)


class _Plugin:
    def __init__(self, state_dict_type: str) -> None:
        self.state_dict_type = state_dict_type
        self.calls = []

    def set_state_dict_type(self, value: str) -> None:
        self.calls.append(value)
        self.state_dict_type = value


def _trainer(plugin, writes):
    """What save_final_model needs of a Trainer: FSDP flags, the plugin, save_model and should_save."""
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), wait_for_everyone=lambda: None)
    trainer = SimpleNamespace(is_fsdp_enabled=plugin is not None, accelerator=accelerator, model=object(),
                              args=SimpleNamespace(should_save=True))
    trainer.save_model = lambda output_dir: writes(output_dir, plugin)
    return trainer


def test_fsdp_final_save_switches_a_sharded_state_dict_to_a_full_one(tiny_stack, tmp_path):
    """transformers' save_model writes nothing under SHARDED_STATE_DICT (FSDP2's default): the final save switches to
    FULL_STATE_DICT first, as the real save_model needs to gather a model."""
    def hf_save_model(output_dir, plugin):  # the Trainer's branch: a full state dict or nothing at all
        if "FULL_STATE_DICT" in str(plugin.state_dict_type):
            _saved(tiny_stack, output_dir)

    plugin = _Plugin("StateDictType.SHARDED_STATE_DICT")
    save_final_model(_trainer(plugin, hf_save_model), str(tmp_path / "fsdp"))
    assert plugin.calls == ["FULL_STATE_DICT"]
    check_saved_model(str(tmp_path / "fsdp"), adapter=False)


def test_a_final_save_that_writes_nothing_fails_loudly(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SaveError, match="the final save left no loadable model in"):
        save_final_model(_trainer(None, lambda output_dir, plugin: None), str(tmp_path / "out"))

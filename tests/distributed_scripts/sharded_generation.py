"""Run under torchrun (2 ranks, gloo, CPU): on-policy generation from a sharded student. ``mode`` is ``fsdp2``
(``fully_shard`` per decoder layer and the root) or ``zero3`` (a DeepSpeed ZeRO-3 engine with an optimizer, as the
Trainer builds it). ``gathered_for_generation`` must give the unsharded model's greedy tokens, gather once per call (not
per generated token), and leave the parameters sharded afterwards. Writes $OUT_DIR/rank<r>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from eakd_llm.models.generation import GenerationSettings, generate_token_ids
from eakd_llm.models.sharding import gathered_for_generation, parameter_elements, shard_teacher_fsdp2


def main(mode: str, student_dir: str, out_dir: str) -> None:
    if mode == "fsdp2":
        dist.init_process_group("gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    prompts = [[0, 11, 22, 33], [0, 44, 55], [0, 66, 77, 88, 99]][rank:] + [[0, 5, 6]]  # ranks differ
    settings = GenerationSettings(max_prompt_length=16, max_length=40, max_new_tokens=10, budget="remaining",
                                  do_sample=False, no_repeat_ngram_size=0, batch_size=8)
    reference = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    expected = generate_token_ids(reference, prompts, settings, eos_ids=[2], pad_id=1, keep_eos=True)

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    full = sum(p.numel() for p in model.parameters())
    if mode == "fsdp2":
        wrapped = shard_teacher_fsdp2(model)  # the same fully_shard layout as training; trainable parameters
    else:
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
        wrapped, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gathers = []
    inner = wrapped.module if mode == "zero3" else wrapped

    def reshard_settings():  # FSDP2's per-module reshard-after-forward settings (the root's differs from the layers')
        fsdp = [m for m in inner.modules() if hasattr(m, "_get_fsdp_state")]
        return [(m._get_fsdp_state()._auto_reshard_after_forward,
                 [g.post_forward_mesh_info is None for g in m._get_fsdp_state()._fsdp_param_groups]) for m in fsdp]

    settings_before = reshard_settings()
    original = dist.all_gather_into_tensor

    def counting(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    dist.all_gather_into_tensor = counting
    try:
        with gathered_for_generation(wrapped) as causal_lm:
            during = len(gathers)
            got = generate_token_ids(causal_lm, prompts, settings, eos_ids=[2], pad_id=1, keep_eos=True)
            after_generate = len(gathers)
    finally:
        dist.all_gather_into_tensor = original
    local, total = parameter_elements(inner)
    settings_after = reshard_settings()
    with torch.no_grad():  # the sharded model still runs its own forward afterwards
        ids = torch.tensor([prompts[0]])
        logits = wrapped(input_ids=ids).logits
        ref_logits = reference(input_ids=ids).logits
    result = {"rank": rank, "equal": got == expected, "new_tokens": [len(t) for t in got],
              "gathers_during_generate": after_generate - during, "local": local, "full": total, "model_full": full,
              "forward_after_max_abs_diff": (logits - ref_logits).abs().max().item(),
              "reshard_settings_kept": settings_before == settings_after}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

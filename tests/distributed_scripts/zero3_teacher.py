"""Run under torchrun (2 ranks, gloo, CPU): the trainer's ZeRO-3 teacher engine shards the teacher's parameters and
gives the same logits as the unsharded teacher. Writes one JSON line per rank to $OUT_DIR/rank<r>.json."""

import json
import os
import sys
from types import SimpleNamespace

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from eakd_llm.config.eakd_config import EAKDConfig
from eakd_llm.models.sharding import deepspeed_inference_engine


def main(teacher_dir: str, out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[0, 11, 22, 33, 44, 55], [0, 66, 77, 88, 99, 2]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "optimizer": {"type": "AdamW"}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))
    args = EAKDConfig(output_dir=os.path.join(out_dir, "unused"), per_device_train_batch_size=2)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    full_elements = sum(p.numel() for p in teacher.parameters())
    engine = deepspeed_inference_engine(teacher, accelerator, args)
    local_elements = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    with torch.no_grad():
        got = engine(input_ids=ids).logits
    # The fused loss gathers the teacher's head once per step; outside the gather a rank holds no full weight.
    head = engine.module.get_output_embeddings().weight
    sharded_numel = head.numel()
    with deepspeed.zero.GatheredParameters([head]):
        gathered = torch.equal(head.detach().clone(), reference.get_output_embeddings().weight)
    result = {"rank": rank, "head_numel_outside_gather": sharded_numel, "head_gathered_equal": gathered,
              "full_elements": full_elements, "local_elements": local_elements,
              "max_abs_diff": (got - expected).abs().max().item(), "stage": engine.zero_optimization_stage()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    # an explicit teardown, as the other scripts do: gloo's threads left to interpreter exit can abort the process
    # ("terminate called without an active exception", exit -6) after the work is done
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

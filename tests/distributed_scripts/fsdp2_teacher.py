"""Run under torchrun (2 ranks, gloo, CPU): the trainer's FSDP2 teacher sharding leaves each rank half of the
teacher's parameter elements and gives the same logits as the unsharded teacher. Writes $OUT_DIR/rank<r>.json.

accelerate cannot select FSDP on a machine without GPUs, so this drives the sharding function the trainer's FSDP2
branch calls (``shard_teacher_fsdp2``) with plain ``torch.distributed``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from eakd_llm.models.sharding import shard_teacher_fsdp2


def main(teacher_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[0, 11, 22, 33, 44, 55], [0, 66, 77, 88, 99, 2]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        expected_hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    full_elements = sum(p.numel() for p in teacher.parameters())
    sharded = shard_teacher_fsdp2(teacher)
    local_elements = sum(p.to_local().numel() for p in sharded.parameters())
    with torch.no_grad():
        got = sharded(input_ids=ids).logits
        hidden = sharded(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        head = sharded.get_output_embeddings().weight.full_tensor()  # what the fused loss gathers once per step
    result = {"rank": rank, "full_elements": full_elements, "local_elements": local_elements,
              "max_abs_diff": (got - expected).abs().max().item(),
              "hidden_max_abs_diff": (hidden - expected_hidden).abs().max().item(),
              "head_equal": torch.equal(head, reference.get_output_embeddings().weight)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Run under torchrun (2 ranks, gloo, CPU): the trainer's fused loss with sharded heads (student with a frozen head,
teacher frozen) gives the same loss and hidden-state gradients as with unsharded models.

Usage: ``fused_sharded_heads.py {zero3,fsdp2} STUDENT_DIR TEACHER_DIR OUT_DIR``; writes ``OUT_DIR/rank<r>.json``.
ZeRO-3 wraps both models in DeepSpeed engines (the teacher through the trainer's own ``deepspeed_inference_engine``);
FSDP2 shards both with ``shard_teacher_fsdp2`` (``fully_shard`` per decoder layer). The heads are then gathered once
per call by ``LiveTeacher.fused_side`` and ``fused_head_loss``, which is what ``EAKDTrainer`` calls.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from eakd_llm.config.eakd_config import EAKDConfig
from eakd_llm.loss.distillation import LossSettings, loss_denominator
from eakd_llm.models.loading import model_inputs
from eakd_llm.models.sharding import is_sharded, unwrap_causal_lm
from eakd_llm.teacher.source import LiveTeacher
from eakd_llm.training.loss_paths import fused_head_loss


def loss_and_grad(student, teacher, ids, labels, args, vocab):
    """Fused loss and its gradient w.r.t. the student's final hidden states (a leaf cut from the backbone)."""
    out = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1].detach().requires_grad_(True)
    denominator = loss_denominator((labels != -100).sum(), None)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with LiveTeacher(teacher).fused_side(batch, model_inputs(batch)) as teacher_side:
        loss, stats, bad = fused_head_loss(unwrap_causal_lm(student), hidden, teacher_side, labels,
                                           LossSettings.from_config(args), denominator, vocab,
                                           chunk_size=args.loss_chunk_size)
    loss.backward()
    return loss.detach(), hidden.grad, stats


def main(mode: str, student_dir: str, teacher_dir: str, out_dir: str) -> None:
    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = EAKDConfig(output_dir=os.path.join(out_dir, "unused"), per_device_train_batch_size=2, kd_ratio=0.5,
                      divergence="jsd", ea=True, ea_granularity="sequence", loss_chunk_size=3)
    ids = torch.tensor([[0, 11, 22, 33, 44, 55, 66, 77], [0, 66, 77, 88, 99, 2, 5, 9]])
    labels = ids[:, 1:].clone()
    labels[:, :2] = -100

    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path)
        model.get_output_embeddings().requires_grad_(False)  # a LoRA-style frozen head
        return model

    ref_student, ref_teacher = load(student_dir), load(teacher_dir).eval().requires_grad_(False)
    vocab = min(ref_student.config.vocab_size, ref_teacher.config.vocab_size)
    expected_loss, expected_grad, _ = loss_and_grad(ref_student, ref_teacher, ids, labels, args, vocab)

    student, teacher = load(student_dir), load(teacher_dir).eval().requires_grad_(False)
    if mode == "zero3":
        from eakd_llm.models.sharding import deepspeed_inference_engine

        ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2,
                     "gradient_accumulation_steps": 1}
        student, *_ = deepspeed.initialize(model=student, config=ds_config,
                                           model_parameters=[p for p in student.parameters() if p.requires_grad])
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
            deepspeed_config={"zero_optimization": {"stage": 3}})))
        teacher = deepspeed_inference_engine(teacher, accelerator, args)
    else:
        from eakd_llm.models.sharding import shard_teacher_fsdp2

        student, teacher = shard_teacher_fsdp2(student), shard_teacher_fsdp2(teacher)
    heads = [unwrap_causal_lm(m).get_output_embeddings() for m in (student, teacher)]
    loss, grad, stats = loss_and_grad(student, teacher, ids, labels, args, vocab)
    result = {
        "rank": rank,
        "heads_sharded": [is_sharded(h) for h in heads],
        "head_numel_after": [h.weight.numel() if mode == "zero3" else h.weight.to_local().numel() for h in heads],
        "head_numel_full": [ref_student.get_output_embeddings().weight.numel(),
                            ref_teacher.get_output_embeddings().weight.numel()],
        "loss": loss.item(), "expected_loss": expected_loss.item(),
        "grad_max_abs_diff": (grad - expected_grad).abs().max().item(),
        "grad_max_abs": expected_grad.abs().max().item(),
        "ea_weight_mean": float(stats["ea_weight_mean"]),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

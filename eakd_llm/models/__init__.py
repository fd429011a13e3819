"""Models: loading and compatibility checks, LoRA (:mod:`.loading`), the student a run starts from (:mod:`.student`),
DeepSpeed/FSDP plumbing (:mod:`.sharding`), sampling with ``generate`` (:mod:`.generation`), the packed-document
isolation check (:mod:`.isolation`), real checkpoints offline (:mod:`.fetch`) and depth pruning (:mod:`.prune`).
"""

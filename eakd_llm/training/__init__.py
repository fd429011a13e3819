"""Training: :class:`~.trainer.EAKDTrainer` (the loss and logging story), its two loss paths (:mod:`.loss_paths`), the
log window (:mod:`.log_window`), on-policy batches (:mod:`.on_policy`) and the ``train`` entry point (:mod:`.train`).
"""

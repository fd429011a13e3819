"""The distillation loss: divergences, entropies and EA-KD weights (:mod:`.distillation`, pure torch, with the
:class:`~.distillation.LossSettings` both loss paths share) and the fused chunked loss from hidden states and heads
(:mod:`.chunked`). The bottom layer: imports nothing else of the package.
"""

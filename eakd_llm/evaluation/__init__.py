"""Evaluation: the MiniLLM/DistiLLM benchmark protocol (:mod:`.protocol`), fidelity of a student to its teacher
(:mod:`.fidelity`) and the local ROUGE-L ``evaluate`` module (:mod:`.metrics`).
"""

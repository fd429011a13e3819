"""The teacher's side: the offline top-k cache (:mod:`.cache`), the teacher sources a training step reads behind one
interface, live or cached (:mod:`.source`), and a teacher's answers to a prompt file (:mod:`.answers`).
"""

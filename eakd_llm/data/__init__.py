"""Records and batches: record formats, prompt templates and chat rendering (:mod:`.prompts`), tokenization with loss
masks, datasets and the collator (:mod:`.dataset`), packing several examples per row (:mod:`.packing`).
"""

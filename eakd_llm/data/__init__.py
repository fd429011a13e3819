"""Records and batches: record formats, prompt templates and chat rendering (:mod:`.prompts`), tokenization with loss
masks, datasets and the collator (:mod:`.dataset`), packing several examples per row (:mod:`.packing`), and the
project's bundled instruction prompt set (:mod:`.instruction_prompts`: the study's prompts, the default calibration
text of pruning).
"""

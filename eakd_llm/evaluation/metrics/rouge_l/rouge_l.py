"""ROUGE-L as the MiniLLM / DistiLLM instruction-following benchmarks score it, as a local ``evaluate`` metric.

Load it with ``evaluate.load("<path to this folder>")`` (no Hub access needed). For every prediction the ROUGE-L
F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` is computed against each of its
references and the best one is kept; ``rougeL`` is the mean of those per-example maxima, in [0, 1] (the benchmarks
report it x100). Per-example scores are returned too.
"""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://www.aclweb.org/anthology/W04-1013",
    pages = "74--81",
}
@inproceedings{gu2024minillm,
    title = "{MiniLLM}: Knowledge Distillation of Large Language Models",
    author = "Gu, Yuxian and Dong, Li and Wei, Furu and Huang, Minlie",
    booktitle = "ICLR",
    year = "2024",
}
"""

_DESCRIPTION = """\
ROUGE-L F-measure (longest common subsequence) computed with Google's `rouge_score` package, Porter stemming on,
taking for every prediction the maximum over its references, as in MiniLLM's `rouge_metric.py`
(`metric_max_over_ground_truths(rouge, ...)`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: for each prediction, one reference string or a non-empty list of acceptable reference strings.
    use_stemmer: Porter-stem tokens before matching (default True, as MiniLLM/DistiLLM).
Returns:
    rougeL: mean over predictions of the best ROUGE-L F-measure over the references, in [0, 1].
    rougeL_per_example: the per-prediction best F-measures, in input order.
Examples:
    >>> metric = evaluate.load("eakd_llm/evaluation/metrics/rouge_l")
    >>> metric.compute(predictions=["the cat runs"], references=[["a dog sleeps", "the cat is running"]])
    {'rougeL': 0.857..., 'rougeL_per_example': [0.857...]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    """ROUGE-L F-measure, max over several references per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://github.com/microsoft/LMOps/tree/main/minillm"],
        )

    def _compute(self, predictions, references, use_stemmer: bool = True) -> dict:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        per_example: list[float] = []
        for index, (prediction, refs) in enumerate(zip(predictions, references)):
            if isinstance(refs, str):
                refs = [refs]
            if not refs:
                raise ValueError(f"prediction {index} has no reference to compare with")
            per_example.append(
                float(max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in refs))
            )
        mean = sum(per_example) / len(per_example) if per_example else 0.0
        return {"rougeL": mean, "rougeL_per_example": per_example}

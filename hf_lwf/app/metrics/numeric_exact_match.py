"""Numeric exact match: an `evaluate` metric comparing the final number of a prediction with the reference."""

import datasets
import evaluate

from hf_lwf.app.tasks import extract_number


_DESCRIPTION = """
Exact match on the numeric answer: the final number of each prediction (the one after "answer is" when present,
else the last number) is compared with the number in the reference, after normalisation ("1,000" == "1000",
"12.0" == "12"). A prediction without a number counts as wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model outputs, e.g. "Tom has 12 apples. The answer is 12."
    references (`list` of `str`): reference answers, e.g. "12" or "The answer is 12."
Returns:
    exact_match (`float`): fraction of predictions whose number equals the reference number (0.0 to 1.0).
    parsed (`float`): fraction of predictions that contain a number at all.
Examples:
    >>> metric = evaluate.load("path/to/numeric_exact_match.py")
    >>> metric.compute(predictions=["The answer is 12.", "I think 7"], references=["12", "8"])
    {'exact_match': 0.5, 'parsed': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NumericExactMatch(evaluate.Metric):
    """Exact match of the extracted numeric answer (the demo's learning-task accuracy)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        extracted = [extract_number(prediction) for prediction in predictions]
        matches = [
            number is not None and number == extract_number(reference)
            for number, reference in zip(extracted, references)
        ]
        total = max(len(matches), 1)
        return {
            "exact_match": sum(matches) / total,
            "parsed": sum(number is not None for number in extracted) / total,
        }

"""Accuracy as an `evaluate` metric module that works offline.

`evaluate.load("accuracy")` needs the Hub; load this one with `evaluate.load(hf_vpt.metrics.ACCURACY_METRIC_PATH)`
(or `hf_vpt.metrics.load_accuracy()`). Same inputs and output as the Hub's accuracy metric.
"""

import datasets
import evaluate


_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references (optionally weighted)."
_INPUTS = """
Args:
    predictions: predicted labels (int).
    references: true labels (int).
    normalize: if False, return the number of correct predictions instead of the fraction (default True).
    sample_weight: optional weights, one per sample.
Returns:
    accuracy: the (weighted) fraction, or count, of correct predictions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        correct = sum(w for p, r, w in zip(predictions, references, weights) if int(p) == int(r))
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else 0.0}

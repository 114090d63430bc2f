"""Binary-classification metrics for click prediction, computed by scikit-learn.

``compute_metrics(labels, probs)`` returns a plain ``dict[str, float]`` with the keys of
:data:`METRIC_NAMES`. Metrics that are undefined for the data (ROC AUC and average
precision when only one class is present, everything on empty input) are ``nan``, with no
warnings.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict

import numpy as np
from sklearn import metrics as skm

__all__ = ["METRIC_NAMES", "compute_metrics", "PROB_CLIP"]

METRIC_NAMES = (
    "roc_auc",
    "log_loss",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "average_precision",
)

# Probabilities are clipped to [PROB_CLIP, 1 - PROB_CLIP] (in float64) for the log loss,
# so a confident wrong prediction costs at most -log(PROB_CLIP) ~ 34.5 instead of inf.
PROB_CLIP = 1e-15


def _as_binary_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = y[~np.isin(y, (0, 1))][:5]
        raise ValueError(f"compute_metrics: labels must be 0 or 1, got e.g. {bad.tolist()}")
    return y.astype(np.int64)


def compute_metrics(labels: np.ndarray, probs: np.ndarray,
                    threshold: float = 0.5) -> Dict[str, float]:
    """Metrics of predicted click probabilities ``probs`` against 0/1 ``labels``.

    A prediction is positive when ``prob >= threshold`` (accuracy, precision, recall, f1);
    precision/recall/f1 use ``zero_division=0``; the log loss uses ``labels=[0, 1]`` and
    clipped probabilities; ROC AUC and average precision are ``nan`` when ``labels`` hold
    a single class.
    """
    y = _as_binary_labels(labels)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(
            f"compute_metrics: {y.shape[0]} labels but {p.shape[0]} probabilities"
        )
    if y.size == 0:
        return {name: math.nan for name in METRIC_NAMES}
    if not np.isfinite(p).all():
        from fedrec.utilities.divergence import NonFinitePredictions

        raise NonFinitePredictions("the model's predicted probabilities contain nan or inf")

    pred = (p >= threshold).astype(np.int64)
    two_classes = np.unique(y).size == 2
    clipped = np.clip(p, PROB_CLIP, 1.0 - PROB_CLIP)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing to warn about once the cases above are handled
        out = {
            "roc_auc": float(skm.roc_auc_score(y, p)) if two_classes else math.nan,
            "log_loss": float(skm.log_loss(y, clipped, labels=[0, 1])),
            "accuracy": float(skm.accuracy_score(y, pred)),
            "precision": float(skm.precision_score(y, pred, zero_division=0)),
            "recall": float(skm.recall_score(y, pred, zero_division=0)),
            "f1": float(skm.f1_score(y, pred, zero_division=0)),
            "average_precision": (float(skm.average_precision_score(y, p))
                                  if two_classes else math.nan),
        }
    return out

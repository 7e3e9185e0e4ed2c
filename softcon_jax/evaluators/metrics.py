"""Retrieval and classification metrics on NumPy arrays (float64): AP, mAP, top-1."""

from __future__ import annotations

import numpy as np

def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one class: mean over positives of the precision at their score.

    AP = sum_t (R_t - R_{t-1}) P_t over the distinct score thresholds t, highest first
    (no interpolation; tied scores form one threshold), which is scikit-learn's
    `average_precision_score`. Sort-based: O(n log n). NaN when there is no positive.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    num_pos = int(labels.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # Last index of every run of tied scores: the thresholds.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp_t = tp[last].astype(np.float64)
    precision = tp_t / (last + 1)
    recall_gain = np.diff(np.r_[0.0, tp_t]) / num_pos
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Micro and macro mAP of (N, C) scores against (N, C) multi-hot labels.

    micro: one AP over all N x C (score, label) pairs. macro: the mean of the per-class APs
    over the classes that have at least one positive (others are excluded, not zero).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"mean_average_precision: scores {scores.shape} and labels "
                         f"{labels.shape} must both be (N, C).")
    per_class = np.array([average_precision(scores[:, c], labels[:, c])
                          for c in range(scores.shape[1])])
    valid = ~np.isnan(per_class)
    return {"map_micro": average_precision(scores, labels),
            "map_macro": float(per_class[valid].mean()) if valid.any() else float("nan"),
            "num_classes_evaluated": int(valid.sum())}


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the integer label."""
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))

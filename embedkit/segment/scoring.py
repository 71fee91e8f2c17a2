"""Instance segmentation scores: the 2018 Data Science Bowl metric (TP / (TP + FP + FN) at IoU thresholds).

A predicted object is a true positive when its IoU with a ground-truth object is above the threshold.
For thresholds of 0.5 and more a match is necessarily one-to-one, so no assignment step is needed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: The DSB 2018 thresholds: 0.5, 0.55, ..., 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist())


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every ground-truth object (rows, labels 1..) with every predicted object (columns).

    Labels need not be consecutive; rows and columns follow the sorted unique non-zero labels.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {truth.shape} vs {pred.shape}")
    t_ids, t_inv = np.unique(truth.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    inter = np.zeros((len(t_ids), len(p_ids)), dtype=np.int64)
    np.add.at(inter, (t_inv, p_inv), 1)
    t_area = inter.sum(axis=1, keepdims=True)
    p_area = inter.sum(axis=0, keepdims=True)
    t_keep = t_ids != 0
    p_keep = p_ids != 0
    inter = inter[t_keep][:, p_keep]
    union = t_area[t_keep] + p_area[:, p_keep] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_counts(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) at one IoU threshold (>= 0.5, so matches are unique)."""
    if threshold < 0.5:
        raise ValueError("thresholds below 0.5 allow one object to match several; use 0.5 or more")
    iou = iou_matrix(truth, pred)
    n_true, n_pred = iou.shape
    tp = int((iou > threshold).sum())
    return tp, n_pred - tp, n_true - tp


def dsb_score(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """TP / (TP + FP + FN) at one IoU threshold; 1.0 when both images are empty."""
    tp, fp, fn = match_counts(truth, pred, threshold)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def dsb_scores(truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS) -> dict[float, float]:
    """The DSB score at each threshold, computing the IoU matrix once."""
    iou = iou_matrix(truth, pred)
    n_true, n_pred = iou.shape
    out = {}
    for t in thresholds:
        if t < 0.5:
            raise ValueError("thresholds below 0.5 allow one object to match several; use 0.5 or more")
        tp = int((iou > t).sum())
        denom = n_true + n_pred - tp
        out[float(t)] = 1.0 if denom == 0 else tp / denom
    return out


def mean_dsb_score(truth: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS) -> float:
    """The Kaggle DSB 2018 image score: the DSB score averaged over IoU 0.5, 0.55, ..., 0.95."""
    return float(np.mean(list(dsb_scores(truth, pred, thresholds).values())))

"""Detection and segmentation metrics as pure numpy functions.

Written here (not taken from scikit-learn) because pixel-level curves run over millions of values and AUPRO
has no library implementation we can depend on; each function is tested against scikit-learn or hand-computed
cases in tests/test_metrics.py. Convention: higher score = more anomalous; a sample is predicted defective
when score >= threshold. Undefined values (one class only, no defect regions) are NaN, not an exception.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata


def _flat(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic (ties count one half)."""
    y, s = _flat(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _desc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct threshold, highest threshold first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_group]
    fp = (last_of_group + 1) - tp
    return tp, fp, s_sorted[last_of_group]


def f1_score_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of the prediction `score >= threshold` (0 when there are no true positives)."""
    y, s = _flat(labels, scores)
    pred = s >= threshold
    tp = int((pred & y).sum())
    denom = int(pred.sum()) + int(y.sum())
    return 2.0 * tp / denom if denom else 1.0


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold that reaches it (the lowest score kept positive)."""
    y, s = _flat(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan"), float("inf")
    tp, fp, thr = _desc_curve(y, s)
    f1 = 2.0 * tp / (tp + fp + n_pos)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[i])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0)."""
    y, s = _flat(labels, scores)
    tp, fp, thr = _desc_curve(y, s)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, thr]


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), highest threshold first."""
    y, s = _flat(labels, scores)
    tp, fp, thr = _desc_curve(y, s)
    return tp / (tp + fp), tp / max(int(y.sum()), 1), thr


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap against false-positive rate, over every threshold (exact, no binning).

    masks, maps: (N, H, W). Regions are 8-connected components of each ground-truth mask. At a threshold t,
    PRO(t) is the mean over regions of the fraction of the region's pixels with score >= t, and FPR(t) is the
    fraction of all defect-free pixels with score >= t. Both are cumulative sums over pixels sorted by score,
    where each region pixel carries weight 1 / (n_regions * region_size).
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks and maps must both be (N, H, W); got {masks.shape} and {maps.shape}")
    weights = np.zeros(masks.shape, dtype=np.float64)
    structure = np.ones((3, 3), dtype=bool)
    region_sizes = []
    labelled = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=structure)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            region_sizes.append(sizes)
            labelled.append((i, lab, sizes))
    n_regions = sum(len(s) for s in region_sizes)
    if n_regions == 0:
        return np.array([0.0]), np.array([0.0])
    for i, lab, sizes in labelled:
        w = np.zeros(len(sizes) + 1)
        w[1:] = 1.0 / (n_regions * sizes)
        weights[i] = w[lab]
    bg = ~masks.ravel()
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    fpr = np.cumsum(bg[order])[last_of_group] / max(int(bg.sum()), 1)
    pro = np.cumsum(weights.ravel()[order])[last_of_group]
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 is perfect)."""
    masks = np.asarray(masks).astype(bool)
    if not masks.any():
        return float("nan")
    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:
        j = int(keep.sum())  # first point past the limit: interpolate the curve at fpr_limit
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two binary masks (all pixels pooled); two empty masks give 1."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    union = int((p | t).sum())
    return float((p & t).sum() / union) if union else 1.0


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient (pixel F1) of two binary masks; two empty masks give 1."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    denom = int(p.sum() + t.sum())
    return float(2.0 * (p & t).sum() / denom) if denom else 1.0


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) pixel counts, rows = true class, columns = predicted class (all pixels pooled)."""
    p = np.asarray(pred).astype(np.int64).ravel()
    t = np.asarray(target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction and target differ in size: {p.size} vs {t.size}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_iou(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class IoU over all pixels pooled (the semantic-segmentation convention); NaN for a class absent
    from both prediction and target."""
    cm = confusion_matrix(pred, target, n_classes).astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)

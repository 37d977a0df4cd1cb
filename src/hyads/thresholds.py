"""Decision threshold calibration and score normalisation.

The stored threshold comes from validation images with defects when there are any (image F1-max), otherwise
from a high quantile of scores on held-out normal images. Scores are then mapped through a logistic curve
centred on the threshold, so a normalised score of 0.5 is exactly the decision boundary whatever the raw scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import f1_max


@dataclass
class Calibration:
    threshold: float
    scale: float
    method: str

    def normalise(self, scores: np.ndarray | float) -> np.ndarray:
        z = (np.asarray(scores, dtype=np.float64) - self.threshold) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def calibrate(
    normal_scores: np.ndarray,
    quantile: float = 0.99,
    defect_scores: np.ndarray | None = None,
) -> Calibration:
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    if normal_scores.size == 0:
        raise ValueError("calibration needs at least one normal score")
    spread = float(np.std(normal_scores)) if normal_scores.size > 1 else 0.0
    if defect_scores is not None and len(defect_scores):
        scores = np.concatenate([normal_scores, np.asarray(defect_scores, dtype=np.float64)])
        labels = np.concatenate([np.zeros(len(normal_scores)), np.ones(len(defect_scores))])
        _, thr = f1_max(labels, scores)
        method = "validation F1-max"
    else:
        thr = float(np.quantile(normal_scores, quantile))
        method = f"quantile {quantile} of {normal_scores.size} held-out normal scores"
    scale = spread if spread > 0 else max(abs(thr) * 0.05, 1e-6)
    return Calibration(float(thr), float(scale), method)

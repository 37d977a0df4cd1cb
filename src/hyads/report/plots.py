"""Evaluation plots with matplotlib's Agg backend (no display needed): ROC, PR, PRO, score histogram,
confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .. import metrics as M  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def roc_plot(labels: np.ndarray, scores: np.ndarray, path: Path) -> str:
    fpr, tpr, _ = M.roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {M.auroc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (image level)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def pr_plot(labels: np.ndarray, scores: np.ndarray, path: Path) -> str:
    precision, recall, _ = M.pr_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(np.r_[0, recall], np.r_[1, precision], lw=2, label=f"F1-max {M.f1_max(labels, scores)[0]:.4f}")
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall (image level)", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return _save(fig, path)


def pro_plot(masks: np.ndarray, maps: np.ndarray, path: Path, fpr_limit: float = 0.3) -> str:
    fpr, pro = M.pro_curve(masks, maps)
    fig, ax = plt.subplots(figsize=(4, 4))
    keep = fpr <= 1.0
    ax.plot(fpr[keep], pro[keep], lw=2, label=f"AUPRO@{fpr_limit} {M.aupro(masks, maps, fpr_limit):.4f}")
    ax.axvline(fpr_limit, color="k", ls="--", lw=0.8)
    ax.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap", title="PRO curve", xlim=(0, 1))
    ax.legend(loc="lower right")
    return _save(fig, path)


def histogram_plot(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defect", color="tab:red")
    ax.axvline(threshold, color="k", ls="--", label="threshold")
    ax.set(xlabel="raw anomaly score", ylabel="images", title="score distribution")
    ax.legend()
    return _save(fig, path)


def confusion_plot(cm: np.ndarray, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(3.4, 3))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "defect"], yticklabels=["normal", "defect"],
           xlabel="predicted", ylabel="actual", title="confusion at threshold")
    return _save(fig, path)

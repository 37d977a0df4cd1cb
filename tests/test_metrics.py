"""Metrics against scikit-learn and hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import f1_score, jaccard_score, precision_recall_curve, roc_auc_score

from hyads import metrics as M


def _sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0)
    return f1.max()


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_f1max_match_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y * rng.uniform(0, 2)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.f1_max(y, s)[0] == pytest.approx(_sk_f1_max(y, s), abs=1e-12)


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=60),
)
@settings(max_examples=150, deadline=None)
def test_auroc_and_f1_with_heavy_ties_match_sklearn(pairs):
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs], dtype=float)  # few distinct values: many ties
    if y.min() == y.max():
        assert math.isnan(M.auroc(y, s))
        return
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f1, thr = M.f1_max(y, s)
    assert f1 == pytest.approx(_sk_f1_max(y, s), abs=1e-12)
    assert M.f1_score_at(y, s, thr) == pytest.approx(f1, abs=1e-12)
    for t in (0.0, 2.0, 5.0, 6.0):
        assert M.f1_score_at(y, s, t) == pytest.approx(f1_score(y, s >= t, zero_division=0.0), abs=1e-12)


def test_edge_cases_all_normal_all_defect():
    s = np.array([0.1, 0.5, 0.9])
    assert math.isnan(M.auroc(np.zeros(3), s))
    assert math.isnan(M.auroc(np.ones(3), s))
    assert math.isnan(M.f1_max(np.zeros(3), s)[0])
    assert M.f1_max(np.ones(3), s)[0] == pytest.approx(1.0)
    assert M.auroc([0, 1], [1.0, 1.0]) == 0.5  # a full tie is chance level


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError):
        M.auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError):
        M.auroc([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(5))
def test_iou_dice_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    p = rng.random((4, 16, 16)) > 0.6
    t = rng.random((4, 16, 16)) > 0.7
    assert M.iou(p, t) == pytest.approx(jaccard_score(t.ravel(), p.ravel()))
    assert M.dice(p, t) == pytest.approx(f1_score(t.ravel(), p.ravel()))


def test_iou_dice_empty():
    z = np.zeros((3, 3), bool)
    assert M.iou(z, z) == 1.0 and M.dice(z, z) == 1.0
    assert M.iou(z, ~z) == 0.0 and M.dice(~z, z) == 0.0
    assert jaccard_score(z.ravel(), z.ravel(), zero_division=1.0) == 1.0


def test_pro_curve_hand_computed():
    # One image, two regions: region A = 2 pixels, region B = 1 pixel; 5 background pixels.
    mask = np.array([[1, 1, 0, 0, 0, 0, 0, 1]], bool)[None]
    amap = np.array([[9, 1, 8, 0, 0, 0, 0, 7]], float)[None]
    fpr, pro = M.pro_curve(mask, amap)
    # thresholds 9, 8, 7, 1, 0: PRO = mean over regions of covered fraction.
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.2, 0.2, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1.0, 1.0])
    # AUPRO to FPR 0.3: area = 0.2*... only the vertical jump at 0 counts until fpr 0.2, then flat at 1.0.
    # Points (0,0),(0,.25),(.2,.25),(.2,.75),(.2,1),(.3,1 interpolated between (.2,1) and (1,1)).
    area = 0.2 * 0.25 + 0.1 * 1.0
    assert M.aupro(mask, amap, 0.3) == pytest.approx(area / 0.3)


def test_aupro_perfect_and_regions_weighted_equally():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 2:4, 2:4] = True  # small region
    masks[1, 5:25, 5:25] = True  # large region
    perfect = masks.astype(float) + 0.01 * rng.random(masks.shape)
    assert M.aupro(masks, perfect) == pytest.approx(1.0)
    # Detect only the large region: PRO saturates at 0.5 because each region counts once.
    half = perfect.copy()
    half[0][masks[0]] = -1.0  # the small region scores below every background pixel
    assert M.aupro(masks, half) == pytest.approx(0.5)
    assert math.isnan(M.aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))

"""The DSB 2018 score on hand-made label images whose answers are worked out by hand."""

import numpy as np
import pytest

from embedkit.segment.scoring import DSB_THRESHOLDS, dsb_score, dsb_scores, iou_matrix, match_counts, mean_dsb_score


def squares(shape=(40, 60), boxes=()):
    lab = np.zeros(shape, np.int32)
    for k, (y, x, h, w, v) in enumerate(boxes):
        lab[y:y + h, x:x + w] = v
    return lab


TRUTH = squares(boxes=[(5, 5, 10, 10, 1), (20, 30, 10, 10, 2)])


def test_identical_labels_score_one_at_every_threshold():
    assert all(s == 1.0 for s in dsb_scores(TRUTH, TRUTH).values())
    assert mean_dsb_score(TRUTH, TRUTH) == 1.0


def test_iou_values_by_hand():
    # second square shifted by 4 columns: intersection 10*6 = 60, union 100 + 100 - 60 = 140
    pred = squares(boxes=[(5, 5, 10, 10, 7), (20, 34, 10, 10, 3)])
    iou = iou_matrix(TRUTH, pred)
    assert iou.shape == (2, 2)
    # columns follow sorted predicted labels: 3 (shifted square), 7 (exact square)
    np.testing.assert_allclose(iou, [[0.0, 1.0], [60 / 140, 0.0]])
    assert match_counts(TRUTH, pred, 0.5) == (1, 1, 1)
    assert dsb_score(TRUTH, pred, 0.5) == pytest.approx(1 / 3)


def test_mean_over_thresholds_by_hand():
    # shift by 2 columns: IoU = 80 / 120 = 0.667, a hit at 0.5 .. 0.65 (4 thresholds), a miss from 0.7 (6 thresholds)
    pred = squares(boxes=[(5, 5, 10, 10, 1), (20, 32, 10, 10, 2)])
    s = dsb_scores(TRUTH, pred)
    assert [s[t] for t in (0.5, 0.55, 0.6, 0.65)] == [1.0] * 4
    assert all(s[t] == pytest.approx(1 / 3) for t in DSB_THRESHOLDS[4:])
    assert mean_dsb_score(TRUTH, pred) == pytest.approx((4 * 1.0 + 6 / 3) / 10)


def test_false_positives_misses_and_empty_images():
    extra = squares(boxes=[(5, 5, 10, 10, 1), (20, 30, 10, 10, 2), (0, 50, 5, 5, 9)])
    assert match_counts(TRUTH, extra) == (2, 1, 0)
    assert dsb_score(TRUTH, extra) == pytest.approx(2 / 3)
    assert dsb_score(TRUTH, np.zeros_like(TRUTH)) == 0.0
    assert dsb_score(np.zeros_like(TRUTH), np.zeros_like(TRUTH)) == 1.0
    assert dsb_score(np.zeros_like(TRUTH), TRUTH) == 0.0


def test_one_prediction_covering_two_nuclei_matches_neither():
    merged = squares(boxes=[(5, 5, 25, 35, 1)])  # one box over both squares: IoU 100/875 with each
    assert match_counts(TRUTH, merged) == (0, 1, 2)


def test_labels_need_not_be_consecutive_and_shapes_must_agree():
    relabelled = np.where(TRUTH == 1, 500, np.where(TRUTH == 2, 17, 0))
    assert dsb_score(TRUTH, relabelled) == 1.0
    with pytest.raises(ValueError):
        iou_matrix(TRUTH, TRUTH[:10])
    with pytest.raises(ValueError):
        match_counts(TRUTH, TRUTH, 0.3)

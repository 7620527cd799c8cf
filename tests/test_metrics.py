"""Tests of instance matching and average precision against hand-counted label images."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import average_precision, intersection_over_union, match_instances


def _hand_drawn_pair() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth 3, 7, 11 and prediction 100, 200, 300 with hand-counted overlaps.

    3 (2x2) vs 100 (2x3): IoU 4/6. 7 (4x2) vs 200 (2x2): IoU 4/8. 11 is missed (FN) and
    300 overlaps nothing (FP).
    """
    truth = np.zeros((10, 10), dtype=np.int32)
    truth[0:2, 0:2] = 3
    truth[5:9, 0:2] = 7
    truth[0:3, 6:9] = 11
    prediction = np.zeros((10, 10), dtype=np.uint16)
    prediction[0:2, 0:3] = 100
    prediction[5:7, 0:2] = 200
    prediction[8:10, 8:10] = 300
    return truth, prediction


def test_square_against_rectangle_has_iou_four_sixths() -> None:
    truth = np.zeros((4, 5), dtype=np.int32)
    truth[1:3, 1:3] = 5
    prediction = np.zeros((4, 5), dtype=np.int32)
    prediction[1:3, 1:4] = 9
    pairs, iou = intersection_over_union(truth, prediction)
    np.testing.assert_array_equal(pairs, [[5, 9]])
    np.testing.assert_allclose(iou, [4 / 6])
    assert average_precision(truth, prediction) == 1.0


def test_hand_counted_matches_at_two_thresholds() -> None:
    truth, prediction = _hand_drawn_pair()
    pairs, iou = intersection_over_union(truth, prediction)
    np.testing.assert_array_equal(pairs, [[3, 100], [7, 200]])
    np.testing.assert_allclose(iou, [4 / 6, 4 / 8])

    at_half = match_instances(truth, prediction, iou_threshold=0.5)
    assert (at_half.tp, at_half.fp, at_half.fn) == (2, 1, 1)
    assert (at_half.n_true, at_half.n_pred) == (3, 3)
    np.testing.assert_array_equal(at_half.true_labels, [3, 7])
    np.testing.assert_array_equal(at_half.pred_labels, [100, 200])
    np.testing.assert_allclose(at_half.iou, [4 / 6, 4 / 8])
    assert average_precision(truth, prediction) == pytest.approx(2 / 4)

    at_sixty = match_instances(truth, prediction, iou_threshold=0.6)
    assert (at_sixty.tp, at_sixty.fp, at_sixty.fn) == (1, 2, 2)
    assert average_precision(truth, prediction, iou_threshold=0.6) == pytest.approx(1 / 5)


def test_low_threshold_assignment_maximises_matches() -> None:
    # Truth A = row 0 cols 0-5, B = row 1 cols 0-2. Prediction P1 = row 0 cols 0-1,
    # P2 = row 0 cols 2-5 plus row 1 cols 0-1. IoU(A, P2) = 4/8 is the largest, so greedy
    # matching takes it and leaves B unmatched; the optimum is A-P1 (2/6) and B-P2 (2/7).
    truth = np.zeros((2, 6), dtype=np.int64)
    truth[0, :] = 1
    truth[1, 0:3] = 2
    prediction = np.zeros((2, 6), dtype=np.int64)
    prediction[0, 0:2] = 10
    prediction[0, 2:6] = 20
    prediction[1, 0:2] = 20
    match = match_instances(truth, prediction, iou_threshold=0.25)
    assert (match.tp, match.fp, match.fn) == (2, 0, 0)
    np.testing.assert_array_equal(match.pred_labels, [10, 20])
    np.testing.assert_allclose(match.iou, [2 / 6, 2 / 7])


def test_low_threshold_prefers_more_matches_over_more_iou() -> None:
    # One row of 20 pixels. Truth A = 0-16, B = 17-19; prediction P1 = 0-2, P2 = 3-19.
    # A-P2 alone has IoU 14/20 = 0.7; A-P1 plus B-P2 has two matches of IoU 3/17 each.
    truth = np.array([[1] * 17 + [2] * 3])
    prediction = np.array([[10] * 3 + [20] * 17])
    match = match_instances(truth, prediction, iou_threshold=0.15)
    assert (match.tp, match.fp, match.fn) == (2, 0, 0)
    np.testing.assert_allclose(match.iou, [3 / 17, 3 / 17])


def test_exact_half_overlap_of_two_predictions_matches_once() -> None:
    truth = np.ones((1, 4), dtype=np.int32)
    prediction = np.array([[1, 1, 2, 2]], dtype=np.int32)
    match = match_instances(truth, prediction, iou_threshold=0.5)
    assert (match.tp, match.fp, match.fn) == (1, 1, 0)


def test_three_dimensional_cubes() -> None:
    truth = np.zeros((4, 3, 3), dtype=np.int32)
    truth[0:2, 0:2, 0:2] = 1
    shifted = np.zeros_like(truth)
    shifted[1:3, 0:2, 0:2] = 4
    _, iou = intersection_over_union(truth, shifted)
    np.testing.assert_allclose(iou, [4 / 12])
    assert average_precision(truth, shifted) == 0.0
    taller = np.zeros_like(truth)
    taller[0:3, 0:2, 0:2] = 4
    np.testing.assert_allclose(intersection_over_union(truth, taller)[1], [8 / 12])
    assert average_precision(truth, taller) == 1.0


def test_permuted_label_ids_give_the_same_scores() -> None:
    truth, prediction = _hand_drawn_pair()
    truth_map = {0: 0, 3: 2**40, 7: 5, 11: 1}
    pred_map = {0: 0, 100: 9, 200: 77, 300: 3}
    renamed_truth = np.vectorize(truth_map.get)(truth).astype(np.int64)
    renamed_prediction = np.vectorize(pred_map.get)(prediction).astype(np.int64)
    match = match_instances(renamed_truth, renamed_prediction)
    assert (match.tp, match.fp, match.fn) == (2, 1, 1)
    matched = dict(zip(match.true_labels.tolist(), match.pred_labels.tolist(), strict=True))
    assert matched == {5: 77, 2**40: 9}


def test_empty_prediction_and_empty_truth() -> None:
    truth, prediction = _hand_drawn_pair()
    nothing = np.zeros_like(truth)
    missed = match_instances(truth, nothing)
    assert (missed.tp, missed.fp, missed.fn) == (0, 0, 3)
    assert average_precision(truth, nothing) == 0.0
    invented = match_instances(nothing, prediction)
    assert (invented.tp, invented.fp, invented.fn) == (0, 3, 0)
    assert average_precision(nothing, prediction) == 0.0
    assert average_precision(nothing, nothing) == 1.0
    assert intersection_over_union(nothing, nothing)[0].shape == (0, 2)


def test_iou_agrees_with_pixel_counting_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (12, 15))
    prediction = rng.choice([0, 4, 19, 1000], size=(12, 15))
    pairs, iou = intersection_over_union(truth, prediction)
    expected = {}
    for t in np.unique(truth[truth > 0]):
        for p in np.unique(prediction[prediction > 0]):
            intersection = np.sum((truth == t) & (prediction == p))
            if intersection:
                expected[(t, p)] = intersection / np.sum((truth == t) | (prediction == p))
    assert [tuple(pair) for pair in pairs.tolist()] == sorted(expected)
    np.testing.assert_allclose(iou, [expected[key] for key in sorted(expected)])


@pytest.mark.parametrize(
    ("truth", "prediction", "message"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "shape"),
        (np.zeros((2, 2), float), np.zeros((2, 2), int), "integers"),
    ],
)
def test_invalid_label_images_raise(
    truth: np.ndarray, prediction: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        match_instances(truth, prediction)


def test_threshold_out_of_range_raises() -> None:
    truth, prediction = _hand_drawn_pair()
    with pytest.raises(ValueError, match="iou_threshold"):
        average_precision(truth, prediction, iou_threshold=0)

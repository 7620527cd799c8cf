"""Tests of instance matching, AP, precision/recall, Jaccard/Dice and the adjusted Rand index.

Expected values are counted by hand in the comments; independent references: the adjusted Rand
index against ``sklearn.metrics.adjusted_rand_score``, matching and AP against StarDist's
``stardist.matching.matching`` on simulated nuclei with typical segmentation errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.qc.metrics import (
    DEFAULT_IOU_THRESHOLDS,
    adjusted_rand_index,
    average_precision,
    intersection_over_union,
    match_instances,
    remove_small_objects,
    score_segmentation,
    summarize,
)


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


# --------------------------------------------------------------------------------------------
# score_segmentation, summarize, remove_small_objects, adjusted_rand_index
# --------------------------------------------------------------------------------------------

LOW = [0.5, 0.55, 0.6]  # thresholds at or below IoU 3/5
HIGH = [0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def _six_by_six() -> tuple[np.ndarray, np.ndarray]:
    """6x6 ground truth 1, 2, 3 and prediction 10, 20, 30, drawn by hand.

    truth        prediction
    1 1 . . . .  10 10 10 .  .  .
    1 1 . . . .  10 .  .  .  .  .
    . . . . . .  .  .  .  30 30 .
    . . . . . 3  .  .  .  .  .  .
    2 2 2 . . 3  20 20 20 .  .  .
    2 2 2 . . 3  20 20 20 .  .  .

    1 (4 px) vs 10 (4 px): intersection 3, union 5, IoU 3/5, Dice 6/8.
    2 (6 px) vs 20 (6 px): identical, IoU 1, Dice 1.
    3 (3 px) is missed (FN); 30 (2 px) touches nothing (FP).
    """
    truth = np.zeros((6, 6), dtype=np.uint16)
    truth[0:2, 0:2] = 1
    truth[4:6, 0:3] = 2
    truth[3:6, 5] = 3
    prediction = np.zeros((6, 6), dtype=np.int32)
    prediction[0, 0:3] = 10
    prediction[1, 0] = 10
    prediction[4:6, 0:3] = 20
    prediction[2, 3:5] = 30
    return truth, prediction


def test_default_thresholds_are_half_to_ninety_five_hundredths() -> None:
    assert DEFAULT_IOU_THRESHOLDS.tolist() == [0.5, *LOW[1:], *HIGH]


def test_six_by_six_scores_by_hand() -> None:
    truth, prediction = _six_by_six()
    scores = score_segmentation(truth, prediction)
    assert (scores.n_true, scores.n_pred) == (3, 3)
    # IoU <= 0.6: 1-10 and 2-20 match: TP 2, FP 1 (30), FN 1 (3).
    # IoU >= 0.65: only 2-20 (IoU 1) matches: TP 1, FP 2, FN 2.
    assert scores.tp.tolist() == [2] * 3 + [1] * 7
    assert scores.fp.tolist() == [1] * 3 + [2] * 7
    assert scores.fn.tolist() == [1] * 3 + [2] * 7
    # AP = TP / (TP + FP + FN): 2/4 low, 1/5 high; precision = recall = 2/3 low, 1/3 high.
    np.testing.assert_allclose(scores.ap, [2 / 4] * 3 + [1 / 5] * 7)
    np.testing.assert_allclose(scores.precision, [2 / 3] * 3 + [1 / 3] * 7)
    np.testing.assert_allclose(scores.recall, [2 / 3] * 3 + [1 / 3] * 7)
    # Mean AP 0.5:0.95 = (3 * 0.5 + 7 * 0.2) / 10.
    assert scores.mean_ap == pytest.approx(0.29)
    # Matched at 0.5: IoU 3/5 and 1, Dice 6/8 and 1.
    assert scores.jaccard == pytest.approx((3 / 5 + 1) / 2)
    assert scores.dice == pytest.approx((6 / 8 + 1) / 2)
    assert scores.at(0.75) == {
        "tp": 1,
        "fp": 2,
        "fn": 2,
        "ap": pytest.approx(0.2),
        "precision": pytest.approx(1 / 3),
        "recall": pytest.approx(1 / 3),
    }
    with pytest.raises(KeyError):
        scores.at(0.3)
    as_dict = scores.to_dict()
    assert as_dict["ap"]["0.5"] == pytest.approx(0.5)
    assert as_dict["ap"]["0.95"] == pytest.approx(0.2)
    assert as_dict["tp"] == {"0.5": 2, "0.55": 2, "0.6": 2} | {f"{t:g}": 1 for t in HIGH}


def test_custom_thresholds_keep_their_order_and_values() -> None:
    truth, prediction = _six_by_six()
    scores = score_segmentation(truth, prediction, thresholds=[0.9, 0.6, 0.61])
    # IoU 3/5 = 0.6 is a match at exactly 0.6 but not at 0.61.
    assert scores.tp.tolist() == [1, 2, 1]
    np.testing.assert_allclose(scores.ap, [1 / 5, 2 / 4, 1 / 5])
    assert scores.jaccard == pytest.approx(0.8)  # always taken at IoU 0.5


def test_split_one_truth_into_two_predictions() -> None:
    # Truth: one 2x4 object (8 px). Prediction: left 2x3 (6 px) and right 2x1 (2 px).
    # IoU(left) = 6/8 = 0.75, IoU(right) = 2/8 = 0.25.
    truth = np.ones((2, 4), dtype=np.int32)
    prediction = np.array([[1, 1, 1, 2], [1, 1, 1, 2]], dtype=np.int32)
    scores = score_segmentation(truth, prediction)
    # Up to 0.75: TP 1 (left), FP 1 (right), FN 0: AP 1/2, precision 1/2, recall 1.
    # Above 0.75: TP 0, FP 2, FN 1: AP 0, precision 0, recall 0.
    np.testing.assert_allclose(scores.ap, [0.5] * 6 + [0.0] * 4)
    np.testing.assert_allclose(scores.precision, [0.5] * 6 + [0.0] * 4)
    np.testing.assert_allclose(scores.recall, [1.0] * 6 + [0.0] * 4)
    assert scores.mean_ap == pytest.approx(0.3)
    assert scores.jaccard == pytest.approx(0.75)
    assert scores.dice == pytest.approx(2 * 6 / (8 + 6))


def test_merge_of_two_truths_into_one_prediction() -> None:
    # Truth: two 2x2 objects side by side. Prediction: one 2x4 object covering both.
    # IoU of each truth with the prediction: 4/8 = 0.5; only one of them may match.
    truth = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], dtype=np.int32)
    prediction = np.full((2, 4), 7, dtype=np.int32)
    scores = score_segmentation(truth, prediction)
    # At 0.5: TP 1, FP 0, FN 1: AP 1/2, precision 1, recall 1/2. Above: TP 0, FP 1, FN 2.
    assert (scores.tp[0], scores.fp[0], scores.fn[0]) == (1, 0, 1)
    assert (scores.tp[1], scores.fp[1], scores.fn[1]) == (0, 1, 2)
    np.testing.assert_allclose(scores.ap, [0.5] + [0.0] * 9)
    np.testing.assert_allclose(scores.precision, [1.0] + [0.0] * 9)
    np.testing.assert_allclose(scores.recall, [0.5] + [0.0] * 9)
    assert scores.mean_ap == pytest.approx(0.05)
    assert scores.jaccard == pytest.approx(0.5)
    assert scores.dice == pytest.approx(2 * 4 / (4 + 8))


def test_empty_prediction_scores_zero_and_no_matched_objects() -> None:
    truth, _ = _six_by_six()
    scores = score_segmentation(truth, np.zeros_like(truth))
    assert scores.tp.tolist() == [0] * 10
    assert scores.fp.tolist() == [0] * 10
    assert scores.fn.tolist() == [3] * 10
    # Precision 0/0 with objects to find is 0 by definition; AP and recall are 0/3.
    assert scores.ap.tolist() == scores.precision.tolist() == scores.recall.tolist() == [0.0] * 10
    assert np.isnan(scores.jaccard) and np.isnan(scores.dice)
    # One predicted cluster: no pair is apart in the prediction, so ARI is exactly 0.
    assert scores.ari == 0.0


def test_empty_truth_with_predictions_scores_zero() -> None:
    _, prediction = _six_by_six()
    scores = score_segmentation(np.zeros_like(prediction), prediction)
    assert (scores.n_true, scores.n_pred) == (0, 3)
    assert scores.fp.tolist() == [3] * 10
    # Recall 0/0 with predictions but nothing to find is 0 by definition.
    assert scores.ap.tolist() == scores.precision.tolist() == scores.recall.tolist() == [0.0] * 10


def test_both_empty_is_a_perfect_score() -> None:
    nothing = np.zeros((5, 5), dtype=np.uint8)
    scores = score_segmentation(nothing, nothing)
    assert (scores.n_true, scores.n_pred) == (0, 0)
    assert scores.ap.tolist() == scores.precision.tolist() == scores.recall.tolist() == [1.0] * 10
    assert scores.mean_ap == 1.0
    assert np.isnan(scores.jaccard) and np.isnan(scores.dice)
    assert scores.ari == 1.0


def test_min_size_drops_tiny_objects_from_both_sides() -> None:
    # Truth: a 2x2 object 1 and a 1-pixel object 2. Prediction: 1 found exactly, plus a
    # 1-pixel object 9 elsewhere. Without min_size: TP 1, FP 1 (9), FN 1 (2): AP 1/3.
    truth = np.zeros((4, 4), dtype=np.int32)
    truth[0:2, 0:2] = 1
    truth[3, 3] = 2
    prediction = np.zeros((4, 4), dtype=np.int32)
    prediction[0:2, 0:2] = 5
    prediction[3, 0] = 9
    assert score_segmentation(truth, prediction).ap[0] == pytest.approx(1 / 3)
    # min_size 2 removes both 1-pixel objects: a perfect score.
    scores = score_segmentation(truth, prediction, min_size=2)
    assert (scores.n_true, scores.n_pred) == (1, 1)
    assert scores.ap.tolist() == [1.0] * 10
    assert scores.ari == 1.0
    assert scores.min_size == 2
    # min_size 5 removes the 4-pixel objects too: both empty.
    assert score_segmentation(truth, prediction, min_size=5).n_true == 0


def test_remove_small_objects_counts_all_pixels_of_an_id() -> None:
    labels = np.array([[1, 0, 1], [2, 0, 3], [3, 3, 0]], dtype=np.uint8)
    # Sizes: 1 -> 2 px (in two pieces), 2 -> 1 px, 3 -> 3 px.
    kept = remove_small_objects(labels, 2)
    np.testing.assert_array_equal(kept, [[1, 0, 1], [0, 0, 3], [3, 3, 0]])
    assert kept.dtype == np.uint8
    assert labels[1, 0] == 2  # input untouched
    np.testing.assert_array_equal(
        remove_small_objects(labels, 3), [[0, 0, 0], [0, 0, 3], [3, 3, 0]]
    )
    np.testing.assert_array_equal(remove_small_objects(labels, 0), labels)
    with pytest.raises(ValueError, match="min_size"):
        remove_small_objects(labels, -1)


def test_three_dimensional_scores() -> None:
    # Cube 2x2x2 (8 voxels) inside a 3x2x2 box (12 voxels): IoU 8/12, Dice 16/20.
    truth = np.zeros((4, 3, 3), dtype=np.int32)
    truth[0:2, 0:2, 0:2] = 1
    prediction = np.zeros_like(truth)
    prediction[0:3, 0:2, 0:2] = 4
    scores = score_segmentation(truth, prediction)
    # Match at 0.5 to 0.65 (8/12 = 0.667), not from 0.7.
    np.testing.assert_allclose(scores.ap, [1.0] * 4 + [0.0] * 6)
    assert scores.jaccard == pytest.approx(8 / 12)
    assert scores.dice == pytest.approx(16 / 20)
    assert scores.ari == pytest.approx(
        adjusted_rand_score(truth.ravel(), prediction.ravel()), abs=1e-12
    )


def test_scores_agree_with_match_instances_at_every_threshold() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 4, (8, 9)).repeat(3, axis=0).repeat(3, axis=1)
    prediction = np.roll(truth, 1, axis=1) * 7
    thresholds = [0.2, 0.3, 0.5, 0.7]
    scores = score_segmentation(truth, prediction, thresholds=thresholds)
    for index, threshold in enumerate(thresholds):
        match = match_instances(truth, prediction, iou_threshold=threshold)
        assert (scores.tp[index], scores.fp[index], scores.fn[index]) == (
            match.tp,
            match.fp,
            match.fn,
        )
        assert scores.ap[index] == pytest.approx(
            average_precision(truth, prediction, iou_threshold=threshold)
        )


@pytest.mark.parametrize("thresholds", [[], [0.0, 0.5], [0.5, 1.01], [0.5, 0.5], [[0.5]]])
def test_invalid_thresholds_raise(thresholds: list) -> None:
    truth, prediction = _six_by_six()
    with pytest.raises(ValueError, match="thresholds"):
        score_segmentation(truth, prediction, thresholds=thresholds)


def test_summarize_averages_over_images_by_hand() -> None:
    truth, prediction = _six_by_six()
    nothing = np.zeros((3, 3), dtype=np.int32)
    first = score_segmentation(truth, prediction)
    second = score_segmentation(nothing, nothing)  # AP 1 everywhere, Jaccard undefined
    summary = summarize([first, second])
    assert summary["n_images"] == 2
    assert summary["thresholds"] == DEFAULT_IOU_THRESHOLDS.tolist()
    # mAP@0.5 = (0.5 + 1) / 2, mAP@0.75 = (0.2 + 1) / 2, mean AP = (0.29 + 1) / 2.
    assert summary["ap"]["0.5"] == pytest.approx(0.75)
    assert summary["ap"]["0.75"] == pytest.approx(0.6)
    assert summary["mean_ap"] == pytest.approx(0.645)
    assert summary["precision"]["0.5"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["recall"]["0.9"] == pytest.approx((1 / 3 + 1) / 2)
    # Jaccard and Dice average the images that have matched pairs: only the first.
    assert summary["jaccard"] == pytest.approx(0.8)
    assert summary["dice"] == pytest.approx(0.875)
    assert summary["ari"] == pytest.approx((first.ari + 1.0) / 2)
    assert (summary["n_true"], summary["n_pred"]) == (3, 3)
    assert (summary["tp"]["0.5"], summary["fp"]["0.5"], summary["fn"]["0.5"]) == (2, 1, 1)
    assert (summary["tp"]["0.95"], summary["fp"]["0.95"], summary["fn"]["0.95"]) == (1, 2, 2)
    assert np.isnan(summarize([second])["jaccard"])


def test_summarize_rejects_no_scores_and_mixed_thresholds() -> None:
    truth, prediction = _six_by_six()
    with pytest.raises(ValueError, match="no scores"):
        summarize([])
    with pytest.raises(ValueError, match="same IoU thresholds"):
        summarize(
            [
                score_segmentation(truth, prediction),
                score_segmentation(truth, prediction, thresholds=[0.5]),
            ]
        )


def test_adjusted_rand_index_by_hand() -> None:
    # Six pixels, 15 pairs. Truth clusters {0: 1 px, 1: 2 px, 2: 3 px}; prediction
    # {0: 2 px, 1: 2 px, 2: 2 px}. Contingency: (1,1) 2, (2,2) 2, (2,0) 1, (0,0) 1.
    # Index = sum C(n_ij, 2) = 1 + 1 = 2; truth sum C(a_i, 2) = 0 + 1 + 3 = 4;
    # prediction sum C(b_j, 2) = 1 + 1 + 1 = 3; expected = 4 * 3 / 15 = 0.8;
    # maximum = (4 + 3) / 2 = 3.5; ARI = (2 - 0.8) / (3.5 - 0.8) = 4/9.
    truth = np.array([[1, 1, 2], [2, 2, 0]])
    prediction = np.array([[1, 1, 2], [2, 0, 0]])
    assert adjusted_rand_index(truth, prediction) == pytest.approx(4 / 9)
    # Renaming the ids of one side (background included) changes nothing.
    assert adjusted_rand_index(truth, prediction * 5 + 3) == pytest.approx(4 / 9)
    assert adjusted_rand_index(truth, truth) == 1.0


@pytest.mark.parametrize(
    ("seed", "shape", "n_true", "n_pred"),
    [(0, (7, 9), 3, 5), (1, (20, 20), 12, 2), (2, (4, 5, 6), 6, 6), (3, (1, 30), 30, 1)],
)
def test_adjusted_rand_index_matches_sklearn_on_random_labels(
    seed: int, shape: tuple[int, ...], n_true: int, n_pred: int
) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_true, shape)
    prediction = rng.choice(np.array([0, -3, 2**33, 17, 5])[:n_pred], size=shape)
    expected = adjusted_rand_score(truth.ravel(), prediction.ravel())
    assert adjusted_rand_index(truth, prediction) == pytest.approx(expected, abs=1e-12)


def test_adjusted_rand_index_matches_sklearn_on_a_large_dense_image() -> None:
    # 1024 x 1024 with about 400 blocky labels on each side, offset by a few pixels.
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 400, (32, 32)).astype(np.uint32)
    truth = np.kron(blocks, np.ones((32, 32), dtype=np.uint32))
    prediction = np.roll(truth, (5, -3), axis=(0, 1))
    prediction[:100] = 0
    expected = adjusted_rand_score(truth.ravel(), prediction.ravel())
    assert adjusted_rand_index(truth, prediction) == pytest.approx(expected, abs=1e-12)


def _perturbed(truth: np.ndarray, seed: int) -> np.ndarray:
    """A prediction with the errors segmenters make: grown or shrunk outlines, a shift,
    merged neighbours, a split nucleus, missed nuclei and false positives."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(seed)
    prediction = expand_labels(truth, distance=int(rng.integers(0, 3)))
    prediction = np.roll(prediction, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    ids = np.unique(prediction[prediction > 0])
    for a, b in rng.choice(ids, size=(3, 2), replace=False):
        prediction[prediction == b] = a  # merged
    for missed in rng.choice(ids, size=3, replace=False):
        prediction[prediction == missed] = 0
    split = rng.choice(ids)
    ys, xs = np.nonzero(prediction == split)
    if len(xs):
        prediction[ys[xs > np.median(xs)], xs[xs > np.median(xs)]] = ids.max() + 1
    for k in range(3):  # blobs in the background
        y, x = rng.integers(5, truth.shape[0] - 5, size=2)
        blob = ndi.binary_dilation(np.pad([[1]], 3).astype(bool), iterations=3)
        region = prediction[y - 3 : y + 4, x - 3 : x + 4]
        region[blob & (region == 0)] = ids.max() + 2 + k
    return prediction


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_stardist_matching_on_simulated_nuclei(seed: int) -> None:
    """StarDist's ``matching`` (the metric behind its published scores on this collection) is
    an independent implementation: its ``accuracy`` is TP / (TP + FP + FN)."""
    from stardist.matching import matching

    from pipeline.synthetic import simulate_field

    truth = simulate_field(n_frames=1, size=192, seed=seed).labels[0].astype(np.int32)
    prediction = _perturbed(truth, seed)
    for threshold in (0.1, 0.3, 0.5, 0.7, 0.9):
        reference = matching(truth, prediction, thresh=threshold)
        ours = match_instances(truth, prediction, iou_threshold=threshold)
        assert (ours.tp, ours.fp, ours.fn) == (reference.tp, reference.fp, reference.fn)
        assert average_precision(truth, prediction, iou_threshold=threshold) == pytest.approx(
            reference.accuracy
        )

"""CLP (Winkens et al. 2020, Sec. 4 / App. C) against values worked out by hand."""
import math

import numpy as np
import pytest
import sklearn.metrics

from contrastood.ood import clp

# Ensemble output for 4 test samples over 3 union classes; classes 0 and 1 are the inliers.
PROBS = np.array([
    [0.50, 0.30, 0.20],
    [0.10, 0.10, 0.80],
    [0.60, 0.20, 0.20],
    [0.05, 0.05, 0.90],
])
LABELS = np.array([0, 2, 0, 2])  # true classes of the test samples (class 1 has none)
IN_CLASSES = [0, 1]


def test_ensemble_probs_is_mean_of_member_softmaxes():
    # Logits chosen as logs of known probabilities, plus per-row shifts a softmax must ignore; the
    # +-1000 shifts overflow a naive exp.
    member_logits = np.array([
        [[0.0, 0.0, 0.0], np.log([1.0, 2.0, 1.0]) + 1000.0],
        [np.log([2.0, 1.0, 1.0]) - 7.0, [-1000.0, -1000.0, -1000.0]],
    ])
    third = 1.0 / 3.0
    expected = np.array([
        [(third + 0.50) / 2, (third + 0.25) / 2, (third + 0.25) / 2],
        [(0.25 + third) / 2, (0.50 + third) / 2, (0.25 + third) / 2],
    ])
    probs = clp.ensemble_probs(member_logits)
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    # float32 network outputs are promoted: results come back in float64.
    small_logits = (member_logits - member_logits.max(axis=-1, keepdims=True)).astype(np.float32)
    probs32 = clp.ensemble_probs(small_logits)
    assert probs32.dtype == np.float64
    np.testing.assert_allclose(probs32, expected, atol=1e-6)


def test_ensemble_probs_averages_probabilities_not_logits():
    member_logits = np.array([[[4.0, 0.0]], [[0.0, 0.0]]])
    s4 = 1.0 / (1.0 + math.exp(-4.0))
    probs = clp.ensemble_probs(member_logits)
    np.testing.assert_allclose(probs, [[(s4 + 0.5) / 2, (1 - s4 + 0.5) / 2]])
    # Averaging logits first would give softmax([2, 0]) = sigmoid(2) ~ 0.881 instead of ~0.741.
    assert abs(probs[0, 0] - 1.0 / (1.0 + math.exp(-2.0))) > 0.1


def test_sample_and_dataset_clp_by_hand():
    inlier_mass = np.array([0.5 + 0.3, 0.1 + 0.1, 0.6 + 0.2, 0.05 + 0.05])
    np.testing.assert_allclose(clp.sample_clp(PROBS, IN_CLASSES), np.log(inlier_mass))
    assert clp.dataset_clp(PROBS, IN_CLASSES) == pytest.approx(math.log((0.8 + 0.2 + 0.8 + 0.1) / 4))
    # Eq. 4 takes the log of the mean, not the mean of the logs.
    assert clp.dataset_clp(PROBS, IN_CLASSES) > np.mean(np.log(inlier_mass))
    # All classes inlier: every sample is fully "confused", CLP = log 1 = 0.
    assert clp.dataset_clp(PROBS, [0, 1, 2]) == pytest.approx(0.0, abs=1e-12)


def test_classwise_clp_and_range_by_hand():
    classwise = clp.classwise_clp(PROBS, LABELS, IN_CLASSES)
    assert set(classwise) == {0, 2}
    assert classwise[0] == pytest.approx(math.log((0.8 + 0.8) / 2))
    assert classwise[2] == pytest.approx(math.log((0.2 + 0.1) / 2))
    low, high = clp.clp_range(classwise)
    assert (low, high) == (pytest.approx(math.log(0.15)), pytest.approx(math.log(0.8)))


def test_class_confusion_by_hand():
    # Eq. 5: u[i, j] = u_{i->j} = mean over class j's samples of c_i(x): column j is class j's mean.
    confusion = clp.class_confusion(PROBS, LABELS, num_classes=3)
    np.testing.assert_allclose(confusion[:, 0], [0.55, 0.25, 0.20])
    np.testing.assert_allclose(confusion[:, 2], [0.075, 0.075, 0.85])
    assert np.all(np.isnan(confusion[:, 1]))  # no test sample of class 1
    assert confusion[2, 0] == pytest.approx(0.20)  # u_{2->0}: class 0's samples called class 2


def test_eq5_and_eq6_against_a_hand_computation():
    """A 3-class ensemble output worked through Eq. 5 and Eq. 6 of Appendix D by hand."""
    probs = np.array([
        [0.8, 0.1, 0.1],  # class 0
        [0.6, 0.3, 0.1],  # class 0
        [0.2, 0.7, 0.1],  # class 1
        [0.0, 0.0, 1.0],  # class 2
        [0.1, 0.1, 0.8],  # class 2
    ])
    labels = np.array([0, 0, 1, 2, 2])
    u = clp.class_confusion(probs, labels, num_classes=3)
    # u_{i->j} = mean over D_test,j of c_i(x)
    hand_u = np.array([
        [(0.8 + 0.6) / 2, 0.2, (0.0 + 0.1) / 2],
        [(0.1 + 0.3) / 2, 0.7, (0.0 + 0.1) / 2],
        [(0.1 + 0.1) / 2, 0.1, (1.0 + 0.8) / 2],
    ])
    np.testing.assert_allclose(u, hand_u, atol=1e-15)
    d = clp.class_distance(u)
    # d(0, 1) = sqrt(-log((u_{0->1} + u_{1->0}) / 2)) = sqrt(-log((0.2 + 0.2) / 2))
    assert d[0, 1] == pytest.approx(math.sqrt(-math.log((0.2 + 0.2) / 2)), abs=1e-15)
    assert d[0, 2] == pytest.approx(math.sqrt(-math.log((0.05 + 0.1) / 2)), abs=1e-15)
    assert d[1, 2] == pytest.approx(math.sqrt(-math.log((0.05 + 0.1) / 2)), abs=1e-15)
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 0.0)


def test_class_distance_symmetric_zero_diagonal_by_hand():
    confusion = np.array([
        [0.90, 0.08, 0.00],
        [0.10, 0.85, 0.05],
        [0.00, 0.00, 0.95],
    ])
    distance = clp.class_distance(confusion)
    np.testing.assert_array_equal(distance, distance.T)
    np.testing.assert_array_equal(np.diag(distance), 0.0)
    assert distance[0, 1] == pytest.approx(math.sqrt(-math.log((0.08 + 0.10) / 2)))
    assert distance[1, 2] == pytest.approx(math.sqrt(-math.log((0.05 + 0.00) / 2)))
    # No mutual confusion at all stays finite (floored) and is the largest distance.
    assert np.isfinite(distance[0, 2]) and distance[0, 2] > distance[1, 2] > distance[0, 1]


def test_class_distance_propagates_empty_classes_as_nan():
    distance = clp.class_distance(clp.class_confusion(PROBS, LABELS, num_classes=3))
    assert np.isnan(distance[0, 1]) and np.isnan(distance[1, 2])
    assert distance[0, 2] == pytest.approx(math.sqrt(-math.log((0.20 + 0.075) / 2)))


def test_dataset_confusion_by_hand():
    by_true_class = np.array([  # rows: a class's samples, columns: the classes they are called
        [0.70, 0.20, 0.06, 0.04],
        [0.30, 0.60, 0.04, 0.06],
        [0.10, 0.00, 0.80, 0.10],
        [np.nan, np.nan, np.nan, np.nan],  # class without test samples is skipped
    ])
    # Eq. 5's u is the transpose (u[i, j]: class j's samples called i).
    result = clp.dataset_confusion(by_true_class.T, class_to_dataset=[0, 0, 1, 1], num_datasets=3)
    np.testing.assert_allclose(result[0], [((0.7 + 0.2) + (0.3 + 0.6)) / 2,
                                           ((0.06 + 0.04) + (0.04 + 0.06)) / 2, 0.0])
    np.testing.assert_allclose(result[1], [0.1 + 0.0, 0.8 + 0.1, 0.0])
    assert np.all(np.isnan(result[2]))  # dataset with no classes
    np.testing.assert_allclose(result[:2].sum(axis=1), 1.0)


def test_dendrogram_linkage_is_average_linkage():
    # Two tight pairs {0, 1} and {2, 3}, far apart.
    distance = np.array([
        [0.0, 1.0, 5.0, 6.0],
        [1.0, 0.0, 7.0, 8.0],
        [5.0, 7.0, 0.0, 2.0],
        [6.0, 8.0, 2.0, 0.0],
    ])
    linkage = clp.dendrogram_linkage(distance)
    assert linkage.shape == (3, 4)
    assert set(linkage[0, :2]) == {0, 1} and linkage[0, 2] == pytest.approx(1.0)
    assert set(linkage[1, :2]) == {2, 3} and linkage[1, 2] == pytest.approx(2.0)
    # Average linkage: the final merge height is the mean of the 4 cross-pair distances
    # (single linkage would give 5, complete linkage 8).
    assert linkage[2, 2] == pytest.approx((5.0 + 6.0 + 7.0 + 8.0) / 4)
    assert linkage[2, 3] == 4


def test_auroc_by_clp_bins_by_hand():
    sample_clp = np.array([-6.0, -5.5, -5.0, -1.0, -0.5, 0.0])
    ood_scores = np.array([0.0, 0.5, 4.0, 2.0, 5.0, 6.0])
    in_scores = np.array([1.0, 2.0, 3.0])
    bins = clp.auroc_by_clp_bins(sample_clp, ood_scores, in_scores, num_bins=3)
    assert [b["count"] for b in bins] == [3, 0, 3]  # the right edge 0.0 falls in the last bin
    np.testing.assert_allclose([b["clp_low"] for b in bins], [-6.0, -4.0, -2.0])
    np.testing.assert_allclose([b["clp_high"] for b in bins], [-4.0, -2.0, 0.0])
    # Far bin: of the 9 (in, ood) pairs the in-dist score is higher in 6 -> 2/3.
    assert bins[0]["auroc"] == pytest.approx(6 / 9)
    assert math.isnan(bins[1]["auroc"])
    # Near bin: only in=3 > ood=2 wins, in=2 vs ood=2 is a tie (counts 1/2) -> 1.5/9.
    assert bins[2]["auroc"] == pytest.approx(1.5 / 9)


def test_auroc_by_class_matches_sklearn():
    rng = np.random.default_rng(0)
    in_scores = rng.normal(1.0, 1.0, size=50)
    ood_labels = np.repeat([3, 7, 11], 20)
    ood_scores = rng.normal(0.0, 1.0, size=60) + (ood_labels == 7)
    result = clp.auroc_by_class(ood_labels, ood_scores, in_scores)
    assert set(result) == {3, 7, 11}
    for label, auroc in result.items():
        class_scores = ood_scores[ood_labels == label]
        expected = sklearn.metrics.roc_auc_score(
            np.r_[np.ones(50), np.zeros(class_scores.size)], np.r_[in_scores, class_scores])
        assert auroc == pytest.approx(expected)
    assert result[7] < min(result[3], result[11])  # the shifted class is the hardest


def test_auroc_by_class_hand_value():
    result = clp.auroc_by_class([0, 0, 1], [0.5, 1.5, 9.0], [1.0, 2.0])
    assert result == {0: pytest.approx(3 / 4), 1: pytest.approx(0.0)}


@pytest.mark.parametrize("fn, args, match", [
    (clp.sample_clp, (PROBS * 1.1, IN_CLASSES), "sum to 1"),
    (clp.dataset_clp, (PROBS, []), "non-empty"),
    (clp.dataset_clp, (PROBS, [0, 3]), r"in \[0, 3\)"),
    (clp.dataset_clp, (PROBS, [-1]), r"in \[0, 3\)"),
    (clp.dataset_clp, (PROBS, [0, 0]), "duplicates"),
    (clp.dataset_clp, (PROBS[:0], IN_CLASSES), "no samples"),
    (clp.dataset_clp, (PROBS - 0.1, IN_CLASSES), "non-negative"),
    (clp.dataset_clp, (PROBS[None], IN_CLASSES), "ensemble_probs"),
    (clp.classwise_clp, (PROBS, [0, -1, 0, 2], IN_CLASSES), "unlabelled"),
    (clp.classwise_clp, (PROBS, [0, 2], IN_CLASSES), "shape"),
    (clp.class_confusion, (PROBS, LABELS, 4), "num_classes"),
    (clp.class_confusion, (PROBS[:, [0, 1, 2]], [0, 1, 3, 2], 3), "< num_classes"),
    (clp.clp_range, ({},), "empty"),
    (clp.class_distance, (np.ones((2, 3)),), "square"),
    (clp.class_distance, (np.full((2, 2), 2.0),), r"\[0, 1\]"),
    (clp.dataset_confusion, (np.eye(3), [0, 1], 2), "one dataset index per class"),
    (clp.dataset_confusion, (np.eye(3), [0, 1, 2], 2), r"in \[0, 2\)"),
    (clp.dendrogram_linkage, (np.array([[0.0, np.nan], [np.nan, 0.0]]),), "NaN"),
    (clp.dendrogram_linkage, (np.array([[0.0, 1.0], [2.0, 0.0]]),), "symmetric"),
    (clp.dendrogram_linkage, (np.zeros((1, 1)),), "at least 2"),
    (clp.ensemble_probs, (np.zeros((4, 3)),), r"logits\[None\]"),
    (clp.ensemble_probs, (np.full((1, 1, 2), np.inf),), "NaN or inf"),
    (clp.auroc_by_clp_bins, ([0.0, 1.0], [0.0], [1.0]), "same"),
    (clp.auroc_by_clp_bins, ([0.0], [0.0], [1.0], 0), "num_bins"),
    (clp.auroc_by_clp_bins, ([-np.inf], [0.0], [1.0]), "non-finite"),
    (clp.auroc_by_class, ([0], [0.0], []), "in_scores"),
])
def test_bad_inputs_raise_clear_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)

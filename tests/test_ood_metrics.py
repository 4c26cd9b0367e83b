"""Golden tests of the OOD metrics against scikit-learn, with heavy ties (integer scores)."""
import numpy as np
import pytest
from sklearn import metrics as skm

from contrastood.ood import metrics

# (n_in, n_out, number of distinct score values): small ranges give many cross-set ties.
CASES = [(1, 1, 2), (7, 3, 3), (20, 13, 4), (57, 41, 6), (200, 150, 10), (1000, 700, 25)]
SEEDS = [0, 1, 2]


def _integer_scores(n_in, n_out, levels, seed):
    rng = np.random.default_rng(seed)
    # In-distribution scores are shifted up so the metrics are not all ~chance.
    in_scores = rng.integers(0, levels, n_in) + rng.integers(0, 2, n_in)
    out_scores = rng.integers(0, levels, n_out)
    return in_scores.astype(np.float64), out_scores.astype(np.float64)


def _sklearn_metrics(in_scores, out_scores):
    scores = np.concatenate([in_scores, out_scores])
    is_in = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    fpr, tpr, _ = skm.roc_curve(is_in, scores, drop_intermediate=False)
    fpr_out, tpr_out, _ = skm.roc_curve(1 - is_in, -scores, drop_intermediate=False)
    precision, recall, _ = skm.precision_recall_curve(is_in, scores)
    precision_out, recall_out, _ = skm.precision_recall_curve(1 - is_in, -scores)
    return {
        "aupr_in_trapezoid": skm.auc(recall, precision),
        "aupr_out_trapezoid": skm.auc(recall_out, precision_out),
        "auroc": skm.roc_auc_score(is_in, scores),
        "aupr_in": skm.average_precision_score(is_in, scores),
        "aupr_out": skm.average_precision_score(1 - is_in, -scores),
        "fpr_at_95_tpr_in": fpr[np.argmax(tpr >= 0.95)],
        "fpr_at_95_tpr_out": fpr_out[np.argmax(tpr_out >= 0.95)],
        "detection_accuracy": np.max(0.5 * tpr + 0.5 * (1 - fpr)),
    }


@pytest.mark.parametrize("n_in,n_out,levels", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_scalar_metrics_match_sklearn_with_ties(n_in, n_out, levels, seed):
    in_scores, out_scores = _integer_scores(n_in, n_out, levels, seed)
    expected = _sklearn_metrics(in_scores, out_scores)
    got = metrics.compute_all(in_scores, out_scores)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-12, err_msg=name)
    # The individual functions agree with compute_all.
    assert metrics.auroc(in_scores, out_scores) == got["auroc"]
    assert metrics.fpr_at_95_tpr_out(in_scores, out_scores) == got["fpr_at_95_tpr_out"]


def test_continuous_scores_match_sklearn():
    rng = np.random.default_rng(3)
    in_scores = rng.normal(1.0, 1.0, 517).astype(np.float32)
    out_scores = rng.normal(0.0, 1.5, 389).astype(np.float32)
    expected = _sklearn_metrics(in_scores.astype(np.float64), out_scores.astype(np.float64))
    got = metrics.compute_all(in_scores, out_scores)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-12, err_msg=name)


def test_tpr_exactly_95_percent_takes_that_point():
    # 20 in-dist scores: TPR reaches exactly 19/20 = 0.95 at the 19th largest, which must be used.
    in_scores = np.arange(20.0)  # the 19th largest is 1.0
    out_scores = np.array([0.5, 1.0, 1.5, 30.0])  # accepted at threshold 1.0: 1.0, 1.5, 30.0
    assert metrics.fpr_at_95_tpr_in(in_scores, out_scores) == 0.75


def test_perfect_and_reversed_separation():
    in_scores, out_scores = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])
    assert metrics.auroc(in_scores, out_scores) == 1.0
    assert metrics.aupr_in(in_scores, out_scores) == 1.0
    assert metrics.aupr_out(in_scores, out_scores) == 1.0
    assert metrics.fpr_at_95_tpr_in(in_scores, out_scores) == 0.0
    assert metrics.fpr_at_95_tpr_out(in_scores, out_scores) == 0.0
    assert metrics.detection_accuracy(in_scores, out_scores) == 1.0
    np.testing.assert_array_equal(metrics.ood_rank(in_scores, out_scores), [0.0, 0.0])
    assert metrics.auroc(out_scores, in_scores) == 0.0
    assert metrics.fpr_at_95_tpr_in(out_scores, in_scores) == 1.0


def test_all_equal_scores_give_sklearn_values():
    in_scores, out_scores = np.full(6, 2.0), np.full(4, 2.0)
    got = metrics.compute_all(in_scores, out_scores)
    assert got == pytest.approx(_sklearn_metrics(in_scores, out_scores) | {"ood_rank_mean": 0.0,
                                                                           "ood_rank_median": 0.0})
    assert got["auroc"] == 0.5 and got["aupr_in"] == 0.6 and got["aupr_out"] == 0.4
    assert got["fpr_at_95_tpr_in"] == 1.0 and got["detection_accuracy"] == 0.5


def test_ood_rank_counts_strictly_lower_in_scores():
    in_scores = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    out_scores = np.array([0.0, 2.0, 2.5, 4.0, 9.0])
    ranks = metrics.ood_rank(in_scores, out_scores)
    # Brute force: percentage of in-dist scores strictly below each OOD score (ties not below).
    expected = 100.0 * (in_scores[None, :] < out_scores[:, None]).mean(axis=1)
    np.testing.assert_allclose(ranks, expected)
    np.testing.assert_allclose(ranks, [0.0, 20.0, 60.0, 80.0, 100.0])
    got = metrics.compute_all(in_scores, out_scores)
    assert got["ood_rank_mean"] == pytest.approx(52.0) and got["ood_rank_median"] == 60.0


def test_accepts_jax_arrays_and_ints():
    import jax.numpy as jnp
    in_scores, out_scores = _integer_scores(30, 20, 5, 7)
    expected = metrics.auroc(in_scores, out_scores)
    assert metrics.auroc(jnp.asarray(in_scores, jnp.float32), jnp.asarray(out_scores, jnp.float32)) == expected
    assert metrics.auroc(in_scores.astype(np.int32), out_scores.astype(np.int64)) == expected


@pytest.mark.parametrize("bad_in,bad_out,match", [
    (np.array([]), np.array([1.0]), "in_scores is empty"),
    (np.array([1.0]), np.array([]), "out_scores is empty"),
    (np.ones((3, 2)), np.array([1.0]), "must be 1-D"),
    (np.array([1.0, np.nan, np.inf, 2.0]), np.array([1.0]), r"2 non-finite.*indices \[1, 2\]"),
    (np.array([1.0]), np.array([-np.inf]), r"out_scores has 1 non-finite.*\[0\]"),
])
def test_rejects_degenerate_input(bad_in, bad_out, match):
    for fn in (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_95_tpr_in,
               metrics.fpr_at_95_tpr_out, metrics.detection_accuracy, metrics.ood_rank, metrics.compute_all):
        with pytest.raises(ValueError, match=match):
            fn(bad_in, bad_out)


@pytest.mark.parametrize("num_positive", [126500, 128660, 130260, 253000, 20, 100, 101])
def test_fpr_at_95_is_exact_where_95_percent_is_a_whole_count(num_positive):
    """At these sizes m / n == 0.95 exactly; a float division one ulp short moved the threshold down."""
    needed = -(-95 * num_positive // 100)
    positives = np.arange(num_positive, 0, -1, dtype=np.float64)  # the m-th largest is n - m + 1
    negatives = np.full(50, num_positive - needed + 0.5)  # just above the (m+1)-th largest positive
    expected = _sklearn_metrics(positives, negatives)
    assert metrics.fpr_at_95_tpr_in(positives, negatives) == expected["fpr_at_95_tpr_in"] == 0.0
    assert metrics.fpr_at_95_tpr_out(-negatives, -positives) == 0.0  # the same case, OOD as positive


@pytest.mark.parametrize("n_in,n_out,levels", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_trapezoid_aupr_matches_sklearn_auc_of_the_pr_curve(n_in, n_out, levels, seed):
    """OpenOOD's AUPR: sklearn.metrics.auc(recall, precision) of precision_recall_curve, ties included."""
    in_scores, out_scores = _integer_scores(n_in, n_out, levels, seed)
    scores = np.concatenate([in_scores, out_scores])
    is_in = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    precision, recall, _ = skm.precision_recall_curve(is_in, scores)
    precision_out, recall_out, _ = skm.precision_recall_curve(1 - is_in, -scores)
    assert metrics.aupr_in_trapezoid(in_scores, out_scores) == pytest.approx(skm.auc(recall, precision), abs=1e-12)
    assert metrics.aupr_out_trapezoid(in_scores, out_scores) == pytest.approx(
        skm.auc(recall_out, precision_out), abs=1e-12)

"""Threshold-free OOD detection metrics (AUROC, AUPR, FPR@95%TPR, detection accuracy, OOD rank).

Convention: a higher score means "more in-distribution". Every metric is computed from exact sort and
search operations (no sigmoid or interpolation), so ties are handled the way scikit-learn handles them:
tied scores form one threshold. The arithmetic runs in JAX under float64 (`jax.enable_x64`) because
the counts behind AUROC reach n_in * n_out ~ 1e10, beyond float32's exact integers, and the golden tests
compare to scikit-learn at 1e-12.

Degenerate inputs are refused rather than silently scored: empty sets, non-1-D arrays and non-finite
scores raise ValueError. All-equal scores are legal and give scikit-learn's values (AUROC 0.5,
AUPR-in n_in / (n_in + n_out), FPR@95 1.0, detection accuracy 0.5, OOD rank 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

TPR_PERCENT = 95  # FPR at this TPR, in percent (an integer: the index is exact)


def validated_scores(name: str, scores) -> np.ndarray:
    """Returns `scores` as a float64 numpy vector, or raises a ValueError that says what is wrong."""
    array = np.asarray(scores)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per example), got shape {array.shape}; "
                         "flatten it or pass one score per example.")
    if array.size == 0:
        raise ValueError(f"{name} is empty; OOD metrics need at least one in- and one "
                         "out-of-distribution score.")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
    array = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} non-finite (NaN/inf) score(s) at indices "
                         f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}; fix the scorer or drop them.")
    return array


def _validated_pair(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
    return validated_scores("in_scores", in_scores), validated_scores("out_scores", out_scores)


@jax.jit
def _auroc(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
    # Mann-Whitney U: P(in > out) + 0.5 P(in == out), equal to the average-rank formula.
    sorted_out = jnp.sort(out_scores)
    below = jnp.searchsorted(sorted_out, in_scores, side="left")
    below_or_equal = jnp.searchsorted(sorted_out, in_scores, side="right")
    wins = jnp.sum(below.astype(jnp.float64)) + 0.5 * jnp.sum((below_or_equal - below).astype(jnp.float64))
    return wins / (in_scores.shape[0] * out_scores.shape[0])


def _threshold_counts(positive_scores: jax.Array, negative_scores: jax.Array):
    """True/false positive counts at every distinct threshold, broadcast back to each example.

    Sorting all scores in decreasing order, the threshold at an example's value accepts every example with
    a score >= it, i.e. everything up to the end of its tie group. Returns (is_positive, true_positives,
    false_positives) per example, where the counts belong to the example's tie group end: ties therefore
    share one ROC/PR point, as in scikit-learn.
    """
    scores = jnp.concatenate([positive_scores, negative_scores])
    is_positive = jnp.concatenate([jnp.ones_like(positive_scores), jnp.zeros_like(negative_scores)])
    order = jnp.argsort(-scores)
    descending = -scores[order]  # ascending in -score, so searchsorted finds tie-group ends.
    is_positive = is_positive[order]
    # searchsorted returns int32 even under x64: widen before any arithmetic.
    group_end = (jnp.searchsorted(descending, descending, side="right") - 1).astype(jnp.int64)
    true_positives = jnp.cumsum(is_positive)[group_end]
    false_positives = (group_end + 1).astype(jnp.float64) - true_positives
    return is_positive, true_positives, false_positives


@jax.jit
def _average_precision(positive_scores: jax.Array, negative_scores: jax.Array) -> jax.Array:
    # AP = sum_k (R_k - R_{k-1}) P_k over tie-group thresholds; each positive adds 1/n_pos recall at the
    # precision of its tie group's threshold, which is the same sum written per example.
    is_positive, true_positives, false_positives = _threshold_counts(positive_scores, negative_scores)
    precision = true_positives / (true_positives + false_positives)
    return jnp.sum(is_positive * precision) / positive_scores.shape[0]


def _fpr_at_tpr(positive_scores: jax.Array, negative_scores: jax.Array) -> jax.Array:
    # The first ROC point (decreasing threshold) with TPR >= 0.95 sits at the m-th largest positive score,
    # m the smallest count with m / n_pos >= 0.95. m comes from exact integer arithmetic (100 m >= 95 n):
    # a float quotient m / n can land one ulp below 0.95 (XLA:CPU's division is not correctly rounded)
    # and move the threshold one positive down. It accepts every negative scoring >= that threshold.
    num_positive = positive_scores.shape[0]
    needed = -(-TPR_PERCENT * num_positive // 100) - 1  # 0-based index of the m-th largest positive
    return _accepted_fraction(positive_scores, negative_scores, needed)


@functools.partial(jax.jit, static_argnums=2)
def _accepted_fraction(positive_scores: jax.Array, negative_scores: jax.Array, needed: int) -> jax.Array:
    threshold = jnp.sort(positive_scores)[::-1][needed]
    below_threshold = jnp.searchsorted(jnp.sort(negative_scores), threshold, side="left")
    accepted_negatives = (negative_scores.shape[0] - below_threshold).astype(jnp.float64)
    return accepted_negatives / negative_scores.shape[0]


@jax.jit
def _detection_accuracy(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
    _, true_positives, false_positives = _threshold_counts(in_scores, out_scores)
    balanced = 0.5 * (true_positives / in_scores.shape[0]) + 0.5 * (1.0 - false_positives / out_scores.shape[0])
    # 0.5 is the "reject everything" point (threshold above every score), part of sklearn's ROC curve.
    return jnp.maximum(jnp.max(balanced), 0.5)


@jax.jit
def _ood_rank(in_scores: jax.Array, out_scores: jax.Array) -> jax.Array:
    strictly_below = jnp.searchsorted(jnp.sort(in_scores), out_scores, side="left").astype(jnp.float64)
    return 100.0 * strictly_below / in_scores.shape[0]


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve with in-distribution as the positive class.

    Rank-based (Mann-Whitney U with average ranks for ties): the probability that a random in-distribution
    score exceeds a random OOD score, ties counting one half. Equals sklearn's `roc_auc_score`.
    """
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_auroc(jnp.asarray(in_scores), jnp.asarray(out_scores)))


def aupr_in(in_scores, out_scores) -> float:
    """Area under the precision-recall curve with in-distribution positive, as average precision
    (sklearn's step-wise sum, no interpolation). OpenOOD and pytorch-ood integrate the same curve with
    the trapezoid rule instead (`aupr_in_trapezoid`); the two differ, most with ties."""
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_average_precision(jnp.asarray(in_scores), jnp.asarray(out_scores)))


def _trapezoid_pr_area(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Trapezoidal area under the precision-recall curve (OpenOOD's and pytorch-ood's AUPR).

    The curve's points are the tie-group thresholds plus sklearn's end point (recall 0, precision 1):
    the value of sklearn.metrics.auc(recall, precision) on precision_recall_curve's output.
    """
    scores = np.concatenate([positive_scores, negative_scores])
    is_positive = np.concatenate([np.ones(len(positive_scores)), np.zeros(len(negative_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    group_end = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(is_positive)[group_end]
    accepted = group_end + 1.0
    precision = true_positives / accepted
    recall = true_positives / len(positive_scores)
    # sklearn stops the curve at the first threshold reaching full recall, then adds (0, 1).
    last = int(np.argmax(recall >= 1.0)) if np.any(recall >= 1.0) else len(recall) - 1
    recall = np.r_[0.0, recall[:last + 1]]
    precision = np.r_[1.0, precision[:last + 1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def aupr_in_trapezoid(in_scores, out_scores) -> float:
    """Trapezoidal AUPR with in-distribution positive (OpenOOD's AUPR-in); AP is `aupr_in`."""
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    return _trapezoid_pr_area(in_scores, out_scores)


def aupr_out_trapezoid(in_scores, out_scores) -> float:
    """Trapezoidal AUPR with OOD positive, ranking by the negated score (OpenOOD's AUPR-out)."""
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    return _trapezoid_pr_area(-out_scores, -in_scores)


def aupr_out(in_scores, out_scores) -> float:
    """Average precision with OOD as the positive class, ranking by the negated score."""
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_average_precision(jnp.asarray(-out_scores), jnp.asarray(-in_scores)))


def fpr_at_95_tpr_in(in_scores, out_scores) -> float:
    """FPR at 95% TPR with in-distribution positive (ODIN / Winkens et al. convention).

    The fraction of OOD examples accepted at the highest threshold that accepts >= 95% of in-distribution
    examples: the first point with TPR >= 0.95 of sklearn's `roc_curve(..., drop_intermediate=False)`.
    Lower is better.
    """
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_fpr_at_tpr(jnp.asarray(in_scores), jnp.asarray(out_scores)))


def fpr_at_95_tpr_out(in_scores, out_scores) -> float:
    """FPR at 95% TPR with OOD positive (OpenOOD convention), ranking by the negated score.

    The fraction of in-distribution examples flagged as OOD at the threshold that flags >= 95% of OOD
    examples. Lower is better.
    """
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_fpr_at_tpr(jnp.asarray(-out_scores), jnp.asarray(-in_scores)))


def detection_accuracy(in_scores, out_scores) -> float:
    """ODIN's detection accuracy: max over thresholds of 0.5 * TPR + 0.5 * TNR (in-distribution positive).

    Thresholds are the ROC points (tie groups) plus "reject everything", so the minimum is 0.5.
    """
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return float(_detection_accuracy(jnp.asarray(in_scores), jnp.asarray(out_scores)))


def ood_rank(in_scores, out_scores) -> np.ndarray:
    """Winkens et al.'s OOD rank: per OOD example, the percentage (0-100) of in-dist scores strictly below it.

    Ties with in-distribution scores do not count as below, so an OOD example tied with every
    in-distribution example gets rank 0: the detector gets no credit for a tie. Lower is better
    (an OOD example ranked below every in-distribution example has rank 0).
    """
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    with jax.enable_x64(True):
        return np.asarray(_ood_rank(jnp.asarray(in_scores), jnp.asarray(out_scores)))


def compute_all(in_scores, out_scores) -> dict[str, float]:
    """Every scalar metric above plus the mean and median OOD rank, keyed by metric name."""
    in_scores, out_scores = _validated_pair(in_scores, out_scores)
    ranks = ood_rank(in_scores, out_scores)
    return {
            "auroc": auroc(in_scores, out_scores),
            "aupr_in": aupr_in(in_scores, out_scores),
            "aupr_out": aupr_out(in_scores, out_scores),
            "aupr_in_trapezoid": aupr_in_trapezoid(in_scores, out_scores),
            "aupr_out_trapezoid": aupr_out_trapezoid(in_scores, out_scores),
            "fpr_at_95_tpr_in": fpr_at_95_tpr_in(in_scores, out_scores),
            "fpr_at_95_tpr_out": fpr_at_95_tpr_out(in_scores, out_scores),
            "detection_accuracy": detection_accuracy(in_scores, out_scores),
            "ood_rank_mean": float(np.mean(ranks)),
            "ood_rank_median": float(np.median(ranks)),
    }

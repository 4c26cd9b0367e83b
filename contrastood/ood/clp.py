"""Confusion Log Probability (CLP): how hard an OOD task is (Winkens et al. 2020, Sec. 4, App. C).

The paper measures how similar an outlier set is to the inlier classes with an *independent*
ensemble of N_e classifiers trained on the union of the inlier and outlier classes (not the OOD
detector under test). For a test sample x, with p^j the softmax of member j:

    Eq. 3  c_k(x) = (1 / N_e) * sum_j p^j(y = k | x)                       (mean ensemble softmax)
    Eq. 4  CLP_{C_in}(D_test) = log( (1 / |D_test|) * sum_{x in D_test} sum_{k in C_in} c_k(x) )

A high CLP (close to 0) means the ensemble often mistakes test samples for inlier classes: a
"near OOD" set. Class-wise CLP is Eq. 4 with D_test = the test samples of one outlier class
(each point of the paper's Fig. 1 / Fig. 6); the [min, max] of the class-wise CLPs is the range
quoted in the paper's table headers. Sample-wise CLP is Eq. 4 for a single sample (Fig. 4c).

Appendix D defines the class confusion and distance behind the dendrogram (Fig. 8):

    Eq. 5  u_{i->j} = (1 / |D_test,j|) * sum_{x in D_test,j} c_i(x)        (class-j samples called i)
    Eq. 6  d(i, j) = sqrt( -log( (u_{i->j} + u_{j->i}) / 2 ) )

and Fig. 7 shows the ensemble's confusion between datasets, rows = true labels, columns = predictions.

Everything here is numpy/scipy on host arrays, in float64: CLPs of far-OOD classes are
around -12 (probabilities ~1e-5), where float32 sums lose precision.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance
import scipy.special

from contrastood.ood import metrics

# Row sums of probabilities may deviate from 1 by float32 round-off of a softmax over ~100 classes.
_SUM_TOLERANCE = 1e-4


def _as_probs(probs) -> np.ndarray:
    """Validates an [N, K] matrix of per-sample class probabilities; returns it as float64."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(
                f"probs must have shape [num_samples, num_classes], got shape {probs.shape}; "
                "average ensemble members first with ensemble_probs().")
    if probs.shape[0] == 0:
        raise ValueError("probs holds no samples; CLP of an empty test set is undefined.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative; pass softmax probabilities, not logits.")
    row_sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _SUM_TOLERANCE:
        raise ValueError(
                f"each row of probs must sum to 1 (row {worst} sums to {row_sums[worst]:.6g}); "
                "pass softmax probabilities over all classes of the union dataset, e.g. from "
                "ensemble_probs(logits).")
    return probs


def _as_class_indices(in_classes, num_classes: int) -> np.ndarray:
    """Validates the inlier class indices C_in: non-empty, unique, in [0, num_classes)."""
    in_classes = np.asarray(in_classes)
    if in_classes.ndim != 1 or in_classes.size == 0:
        raise ValueError("in_classes must be a non-empty 1-D sequence of inlier class indices.")
    if not np.issubdtype(in_classes.dtype, np.integer):
        raise ValueError(f"in_classes must hold integer class indices, got dtype {in_classes.dtype}.")
    if in_classes.min() < 0 or in_classes.max() >= num_classes:
        raise ValueError(
                f"in_classes must lie in [0, {num_classes}) (the ensemble's classes), got "
                f"min {in_classes.min()} and max {in_classes.max()}.")
    if np.unique(in_classes).size != in_classes.size:
        raise ValueError("in_classes has duplicates; each inlier class must be counted once in Eq. 4.")
    return in_classes


def _as_labels(labels, num_samples: int, num_classes: int | None = None) -> np.ndarray:
    """Validates per-sample integer labels; -1 (unlabelled) is rejected since it has no class."""
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if num_samples and labels.min() < 0:
        raise ValueError(
                "labels contain negative values (-1 = unlabelled); per-class statistics need labelled "
                "samples, so drop them first (or use dataset_clp for an unlabelled set).")
    if num_classes is not None and num_samples and labels.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got max {labels.max()}.")
    return labels


def ensemble_probs(member_logits) -> np.ndarray:
    """Eq. 3: mean softmax of an ensemble, [E, N, K] logits -> [N, K] float64 probabilities.

    The softmax is taken per member (in float64, max-subtracted by scipy) before averaging, as the
    paper averages member *probabilities*, not logits.
    """
    logits = np.asarray(member_logits, dtype=np.float64)
    if logits.ndim != 3:
        raise ValueError(
                f"member_logits must have shape [num_members, num_samples, num_classes], got "
                f"{logits.shape}; for a single classifier pass logits[None].")
    if 0 in logits.shape:
        raise ValueError(f"member_logits has an empty axis: shape {logits.shape}.")
    if not np.all(np.isfinite(logits)):
        raise ValueError("member_logits contains NaN or inf.")
    return scipy.special.softmax(logits, axis=-1).mean(axis=0)


def sample_clp(probs, in_classes) -> np.ndarray:
    """Sample-wise CLP, [N]: log of the ensemble probability mass on the inlier classes.

    Can be -inf where that mass underflows to exactly 0.
    """
    probs = _as_probs(probs)
    in_classes = _as_class_indices(in_classes, probs.shape[1])
    with np.errstate(divide="ignore"):
        return np.log(probs[:, in_classes].sum(axis=1))


def dataset_clp(probs, in_classes) -> float:
    """Eq. 4: CLP of a whole test set, log of the mean (over samples) inlier probability mass."""
    probs = _as_probs(probs)
    in_classes = _as_class_indices(in_classes, probs.shape[1])
    with np.errstate(divide="ignore"):
        return float(np.log(probs[:, in_classes].sum(axis=1).mean()))


def classwise_clp(probs, labels, in_classes) -> dict[int, float]:
    """Eq. 4 restricted to the test samples of each label present in `labels` (Fig. 1 x-axis).

    Labels are the test samples' own classes in the union label space (e.g. CIFAR-100 classes as
    outliers); keys are the labels that occur, sorted.
    """
    probs = _as_probs(probs)
    in_classes = _as_class_indices(in_classes, probs.shape[1])
    labels = _as_labels(labels, probs.shape[0])
    inlier_mass = probs[:, in_classes].sum(axis=1)
    result = {}
    with np.errstate(divide="ignore"):
        for label in np.unique(labels):
            result[int(label)] = float(np.log(inlier_mass[labels == label].mean()))
    return result


def clp_range(classwise: Mapping[int, float]) -> tuple[float, float]:
    """[min, max] of class-wise CLPs: the range the paper quotes per benchmark (e.g. [-7.4, -0.8])."""
    values = np.asarray(list(classwise.values()), dtype=np.float64)
    if values.size == 0:
        raise ValueError("classwise is empty; compute it with classwise_clp() on a labelled test set.")
    if np.any(np.isnan(values)):
        raise ValueError("classwise contains NaN CLP values.")
    return float(values.min()), float(values.max())


def class_confusion(probs, labels, num_classes: int) -> np.ndarray:
    """Eq. 5, u [K, K] with u[i, j] = u_{i->j}: the mean of c_i(x) over the test samples x of class j.

    Column j is the mean ensemble probability vector of class j's samples, so each populated column
    sums to 1 (the transpose of a row-normalised "rows = true label" confusion matrix). Columns of
    classes without any test sample are NaN (there is nothing to average); callers must drop or
    handle them before clustering.
    """
    probs = _as_probs(probs)
    if probs.shape[1] != num_classes:
        raise ValueError(
                f"probs has {probs.shape[1]} classes but num_classes={num_classes}; the ensemble must "
                "cover every class of the union dataset.")
    labels = _as_labels(labels, probs.shape[0], num_classes)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(sums, labels, probs)  # sums[j, i] = sum over class-j samples of c_i(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).T


def class_distance(confusion) -> np.ndarray:
    """Eq. 6, d [K, K] = sqrt(-log((u[i, j] + u[j, i]) / 2)), with a zero diagonal.

    Averaging the two directions makes the directional confusion a symmetric distance. Zero mutual
    confusion is floored at the smallest positive float64 (d ~ 26.6) so that the linkage stays
    finite. NaN entries of `confusion` (classes without test samples) give NaN distances.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [K, K] matrix, got shape {confusion.shape}.")
    finite = confusion[np.isfinite(confusion)]
    if np.any(np.isinf(confusion)) or np.any(finite < 0) or np.any(finite > 1 + _SUM_TOLERANCE):
        raise ValueError("confusion must hold probabilities in [0, 1] (or NaN for empty classes).")
    mutual = 0.5 * (confusion + confusion.T)
    # A mutual confusion above 1 by float round-off would give sqrt of a tiny negative number.
    distance = np.sqrt(np.maximum(-np.log(np.maximum(mutual, np.finfo(np.float64).tiny)), 0.0))
    distance[np.isnan(mutual)] = np.nan
    np.fill_diagonal(distance, 0.0)
    return distance


def dataset_confusion(confusion, class_to_dataset: Sequence[int], num_datasets: int) -> np.ndarray:
    """Dataset-level confusion (Fig. 7), [D, D], rows = true dataset, columns = predicted dataset.

    Entry [a, b] is the mean, over the classes j of dataset a, of the total probability
    sum_{i in b} u_{i->j} that the ensemble gives to b's classes on class j's samples (`confusion`
    is Eq. 5's u). Every class of a weighs the same (the paper's test sets are class-balanced, where
    this equals averaging over samples); classes without test samples (NaN columns of u) are
    skipped, and a dataset with no such class gets a NaN row. Populated rows sum to 1.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [K, K] matrix, got shape {confusion.shape}.")
    class_to_dataset = np.asarray(class_to_dataset)
    if class_to_dataset.shape != (confusion.shape[0],):
        raise ValueError(
                f"class_to_dataset must give one dataset index per class ({confusion.shape[0]}), got "
                f"shape {class_to_dataset.shape}.")
    if not np.issubdtype(class_to_dataset.dtype, np.integer):
        raise ValueError("class_to_dataset must hold integer dataset indices.")
    if class_to_dataset.min() < 0 or class_to_dataset.max() >= num_datasets:
        raise ValueError(f"class_to_dataset values must lie in [0, {num_datasets}).")
    by_true_class = confusion.T  # [j, i]: class j's samples predicted as class i
    # [K, D]: probability each class's samples put on each dataset's classes.
    mass_per_dataset = np.zeros((confusion.shape[0], num_datasets), dtype=np.float64)
    for dataset in range(num_datasets):
        mass_per_dataset[:, dataset] = by_true_class[:, class_to_dataset == dataset].sum(axis=1)
    populated = ~np.any(np.isnan(by_true_class), axis=1)
    result = np.full((num_datasets, num_datasets), np.nan)
    for dataset in range(num_datasets):
        rows = populated & (class_to_dataset == dataset)
        if rows.any():
            result[dataset] = mass_per_dataset[rows].mean(axis=0)
    return result


def dendrogram_linkage(distance) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchy of classes from a class distance matrix (Fig. 8).

    Returns scipy's linkage matrix [K - 1, 4]: merged cluster ids, merge height, cluster size.
    """
    distance = np.asarray(distance, dtype=np.float64)
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"distance must be a square [K, K] matrix, got shape {distance.shape}.")
    if distance.shape[0] < 2:
        raise ValueError("a dendrogram needs at least 2 classes.")
    if not np.all(np.isfinite(distance)):
        raise ValueError(
                "distance contains NaN or inf, e.g. from classes without test samples; drop those rows "
                "and columns first.")
    if not np.allclose(distance, distance.T) or np.any(np.diag(distance) != 0):
        raise ValueError("distance must be symmetric with a zero diagonal; build it with class_distance().")
    condensed = scipy.spatial.distance.squareform(distance, checks=False)
    return scipy.cluster.hierarchy.linkage(condensed, method="average")


def auroc_by_clp_bins(sample_clp, ood_scores, in_scores, num_bins: int = 10) -> list[dict]:
    """AUROC of the OOD samples in each bin of sample-wise CLP against all in-dist scores (Fig. 4c).

    Shows where in the near/far OOD spectrum a detector fails. Bins are equal-width between the
    smallest and largest sample CLP (the last bin includes its right edge). Scores follow the
    convention higher = more in-distribution, and AUROC takes in-distribution as positive. Returns
    one dict per bin: clp_low, clp_high, count, auroc (NaN for an empty bin).
    """
    sample_clp = metrics.validated_scores("sample_clp", sample_clp)
    ood_scores = metrics.validated_scores("ood_scores", ood_scores)
    in_scores = metrics.validated_scores("in_scores", in_scores)
    if sample_clp.shape != ood_scores.shape:
        raise ValueError(
                f"sample_clp {sample_clp.shape} and ood_scores {ood_scores.shape} must describe the same "
                "OOD samples.")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}.")
    edges = np.histogram_bin_edges(sample_clp, bins=num_bins)
    bin_index = np.clip(np.searchsorted(edges, sample_clp, side="right") - 1, 0, num_bins - 1)
    bins = []
    for index in range(num_bins):
        in_bin = bin_index == index
        count = int(in_bin.sum())
        auroc = metrics.auroc(in_scores, ood_scores[in_bin]) if count else float("nan")
        bins.append({"clp_low": float(edges[index]), "clp_high": float(edges[index + 1]),
                                  "count": count, "auroc": auroc})
    return bins


def auroc_by_class(ood_labels, ood_scores, in_scores) -> dict[int, float]:
    """AUROC of each OOD class against all in-dist scores (Fig. 1 / Fig. 6 y-axis).

    Same conventions as auroc_by_clp_bins: higher score = more in-distribution, in-dist positive.
    """
    ood_scores = metrics.validated_scores("ood_scores", ood_scores)
    in_scores = metrics.validated_scores("in_scores", in_scores)
    ood_labels = _as_labels(ood_labels, ood_scores.shape[0])
    return {int(label): metrics.auroc(in_scores, ood_scores[ood_labels == label])
                    for label in np.unique(ood_labels)}

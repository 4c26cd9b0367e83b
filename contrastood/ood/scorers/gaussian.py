"""Class-conditional Gaussians on the penultimate features: the paper's Eq. 2 and its ablations.

Scorers: `gaussian` (Eq. 2: max over classes of the log-density, per-class covariance),
`gaussian_no_logdet` (the same without the log-determinant), `mahalanobis` (tied covariance, Lee et al.
2018). Convention: a higher score means "more in-distribution".

Precision. The Gaussian scores sum d ~ 6144 squared, whitened terms and a log-determinant of the same
size, and the covariance eigenvalues they divide by span many orders of magnitude, so fitting and scoring
run in float64 by default (under `jax.enable_x64`, without changing the caller's global setting). Pass
`dtype=jnp.float32` on accelerators without fast float64 (TPUs, consumer GPUs); every matmul asks for
`Precision.HIGHEST` so that GPUs (TF32) and TPUs (bf16) do not silently drop to lower precision.

Memory and speed. A full d x d Cholesky factor per class is 100 x 6144^2 x 8 bytes = 30 GB for a
WRN-50x3 on CIFAR-100. When a class has fewer examples than dimensions (n_c < d), its empirical
covariance has rank < n_c, so the shrunk covariance (1 - a) S_c + a mu I is stored exactly as thin eigen
factors (U_c [d, r], variances [r], and one variance for the orthogonal complement), found from the
n_c x n_c Gram matrix; Mahalanobis distances then follow from Woodbury and log-determinants from the
matrix determinant lemma, at C * d * n_c memory and 2 M d n_c flops per class (a Cholesky solve costs
M d^2). With n_c >= d (or a tied covariance) the factors are the full eigenbasis. Scoring is chunked
over examples and over blocks of classes; benchmarks/ood_eval.py measures it against a per-class
scikit-learn + Cholesky reference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from contrastood.ood.scorers.base import (FitContext, Scorer, as_matrix, check_chunk, check_dtype, chunks,
                                          padded_chunk, register)

try:  # Optional (a scikit-learn dependency): only used to keep small LAPACK calls single-threaded.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

HIGHEST = jax.lax.Precision.HIGHEST
SHRINKAGE_METHODS = ("ledoit_wolf", "ridge", "none")
# Rows per device call when accumulating a d x d scatter matrix (bounds memory to chunk x d floats).
_SCATTER_CHUNK_ROWS = 4096


# ----------------------------------------------------------------------------------------------------
# Class-conditional Gaussians.


@dataclasses.dataclass(frozen=True)
class GaussianParams:
    """Class-conditional Gaussians N(mu_c, Sigma_c) with Sigma_c stored as eigen factors.

    Sigma_c = U_c diag(variances_c) U_c^T + complement_variance_c * (I - U_c U_c^T). U_c has r orthonormal
    columns (r = d: full eigenbasis, the complement is empty; r < d: thin factors of a rank-deficient
    class covariance, see the module docstring), stored as the rows of `components` (like sklearn's PCA)
    so that a block of classes is one contiguous [B * r, d] matrix for scoring. Padding rows are zero
    with variance equal to the complement variance, so they drop out of every formula. With `tied`, the
    leading axis of the factors has size 1 and is shared by every class.

    Attributes:
      means: [C, d] class means.
      components: [G, r, d] rows U_c^T (G = C, or 1 when tied), in the fit's dtype (the only large
        array: G * r * d floats).
      variances: [G, r] variance of Sigma_c along each column of U_c.
      complement_variance: [G] variance along every direction orthogonal to U_c (unused when r = d).
      log_dets: [C] log det Sigma_c.
      counts: [C] training examples per class.
      tied: whether one covariance (pooled over class-centred data) is shared by all classes.
      shrinkage: "ledoit_wolf", "ridge" or "none".
      shrinkage_coefs: [G] Ledoit-Wolf coefficient a in (1 - a) S + a (tr S / d) I; for "ridge" the
        variance added to the diagonal; 0 for "none".
    """

    means: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    complement_variance: np.ndarray
    log_dets: np.ndarray
    counts: np.ndarray
    tied: bool
    shrinkage: str
    shrinkage_coefs: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def covariance(self, class_index: int) -> np.ndarray:
        """Dense d x d Sigma_c, for inspection and tests (d^2 memory: avoid at large d)."""
        group = 0 if self.tied else class_index
        vecs, variances = self.components[group].T, self.variances[group]
        cov = (vecs * variances) @ vecs.T
        if vecs.shape[1] < self.dim:
            cov += self.complement_variance[group] * (np.eye(self.dim) - vecs @ vecs.T)
        return cov


def _shrink(eigenvalues, trace, beta_sum, frobenius_sq, num_examples, dim, method, ridge):
    """Shrunk variances along the eigenvectors of S, the complement variance, and the coefficient.

    Ledoit-Wolf follows sklearn.covariance.ledoit_wolf_shrinkage exactly, from sufficient statistics of
    the centred data X [n, d]: trace = tr S, beta_sum = sum_k ||x_k||^4, frobenius_sq = ||S||_F^2.
    """
    eigenvalues = jnp.maximum(eigenvalues, 0.0)  # eigh noise can go slightly negative on a PSD matrix.
    target = trace / dim
    if method == "ledoit_wolf":
        if dim == 1:  # sklearn: "for only one feature, the result is the same whatever the shrinkage".
            coef = jnp.zeros_like(trace)
        else:
            beta = (beta_sum / num_examples - frobenius_sq) / (dim * num_examples)
            delta = (frobenius_sq - 2.0 * target * trace + dim * target ** 2) / dim
            beta = jnp.minimum(beta, delta)
            coef = jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
        complement = coef * target
        return (1.0 - coef) * eigenvalues + complement, complement, coef
    if method == "ridge":
        complement = ridge * target
        return eigenvalues + complement, complement, complement
    return eigenvalues, jnp.zeros_like(trace), jnp.zeros_like(trace)


@functools.partial(jax.jit, static_argnames=("method", "dtype"))
def _fit_thin(examples, mean, count, ridge, *, method, dtype):
    """Thin eigen factors of one class's shrunk covariance from its n x n Gram matrix (n < d).

    `examples` is [n_max, d], zero-padded past `count` rows. With X the centred data, X X^T = V G V^T
    gives S = X^T X / n = U diag(G / n) U^T with U^T = G^{-1/2} V^T X: O(n^2 d) instead of O(n d^2 + d^3).
    """
    num_rows, dim = examples.shape
    valid = (jnp.arange(num_rows) < count)[:, None]
    centred = jnp.where(valid, examples.astype(dtype) - mean.astype(dtype), 0.0)
    count = count.astype(dtype)
    gram = jnp.dot(centred, centred.T, precision=HIGHEST)
    row_norms_sq = jnp.diagonal(gram)
    gram_eigenvalues, gram_eigvecs = jnp.linalg.eigh(gram)  # ascending
    # Directions with ~zero sample variance belong to the complement: their U rows would be noise.
    tolerance = jnp.max(gram_eigenvalues) * max(num_rows, dim) * jnp.finfo(dtype).eps
    keep = gram_eigenvalues > tolerance
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, gram_eigenvalues, 1.0)), 0.0)
    components = scale[:, None] * jnp.dot(gram_eigvecs.T, centred, precision=HIGHEST)
    variances, complement, coef = _shrink(
        gram_eigenvalues / count, jnp.sum(row_norms_sq) / count, jnp.sum(row_norms_sq ** 2),
        jnp.sum(gram ** 2) / count ** 2, count, dim, method, ridge)
    variances = jnp.where(keep, variances, complement)
    return components, variances, complement, coef


@functools.partial(jax.jit, static_argnames=("dtype",))
def _scatter_chunk(examples, labels, means, valid, *, dtype):
    """(X^T X, sum_k ||x_k||^4) of one chunk of class-centred rows; padding rows contribute zero."""
    centred = jnp.where(valid[:, None], examples.astype(dtype) - means.astype(dtype)[labels], 0.0)
    row_norms_sq = jnp.sum(centred * centred, axis=1)
    return jnp.dot(centred.T, centred, precision=HIGHEST), jnp.sum(row_norms_sq ** 2)


@functools.partial(jax.jit, static_argnames=("method", "dtype"))
def _fit_full(scatter, beta_sum, count, ridge, *, method, dtype):
    """Full eigenbasis of a shrunk covariance from its scatter matrix X^T X (n >= d, or tied)."""
    count = jnp.asarray(count, dtype)
    cov = scatter / count
    eigenvalues, eigvecs = jnp.linalg.eigh(cov)
    variances, complement, coef = _shrink(eigenvalues, jnp.trace(cov), beta_sum, jnp.sum(cov ** 2), count,
                                          cov.shape[0], method, ridge)
    return eigvecs.T, variances, complement, coef


def _scatter(features: np.ndarray, labels: np.ndarray, means: np.ndarray, rows: int,
             dtype) -> tuple[jax.Array, jax.Array]:
    """Accumulates the scatter matrix of the class-centred features in chunks of `rows` rows."""
    device_means = jnp.asarray(means, dtype)
    scatter, beta_sum = 0.0, 0.0
    for start, stop in chunks(features.shape[0], rows):
        valid = np.arange(rows) < stop - start
        chunk_scatter, chunk_beta = _scatter_chunk(
            padded_chunk(features, start, stop, rows), padded_chunk(labels, start, stop, rows), device_means,
            valid, dtype=dtype)
        scatter, beta_sum = scatter + chunk_scatter, beta_sum + chunk_beta
    return scatter, beta_sum


def _check_nonsingular(variances: np.ndarray, complement: float, dim: int, dtype, shrinkage: str,
                       what: str) -> None:
    """Refuses covariances that cannot be inverted in `dtype`.

    A positive shrinkage floor (the complement variance, computed exactly rather than by eigh) makes the
    covariance invertible; without one, variances at eigh's noise level (numpy's matrix-rank tolerance,
    largest * d * eps) mean a rank-deficient covariance.
    """
    present = np.append(variances, complement) if len(variances) < dim else np.asarray(variances)
    largest, smallest = float(present.max()), float(present.min())
    eps = np.finfo(dtype).eps
    has_floor = shrinkage != "none" and complement > largest * eps
    if not largest > 0 or (not has_floor and smallest <= largest * dim * eps):
        fix = ("use shrinkage='ledoit_wolf' or shrinkage='ridge'" if shrinkage == "none" else
               "use shrinkage='ridge' with a larger `ridge`" if largest > 0 else
               "the features are constant; check the feature extraction")
        raise ValueError(f"{what} covariance is singular (variances from {smallest:.3g} to {largest:.3g}, "
                         f"shrinkage={shrinkage!r}): {fix}.")


def fit_gaussians(features, labels, num_classes: int, *, tied: bool = False,
                  shrinkage: str = "ledoit_wolf", ridge: float = 1e-6, dtype=jnp.float64) -> GaussianParams:
    """Fits one Gaussian per class to training features (MLE covariance, divided by n as in sklearn).

    Args:
      features: [N, d] training features (e.g. pre-logits).
      labels: [N] integer labels in [0, num_classes). Drop unlabelled (-1) examples first.
      num_classes: C. Every class needs >= 1 example, and unless `tied` >= 2 with shrinkage "ridge" or
        "none" and >= 3 with "ledoit_wolf" (a covariance from one example is zero, and Ledoit-Wolf's
        shrinkage is exactly 0 at two, leaving a singular covariance); an empty class has no mean and
        raises ValueError.
      tied: share one covariance, estimated from all examples centred on their class means (Lee et al.
        2018), instead of one per class (Winkens et al. 2020).
      shrinkage: "ledoit_wolf": the sklearn.covariance.ledoit_wolf estimator on each class's centred data
        (on the pooled class-centred data when tied); "ridge": S + ridge * (tr S / d) I; "none": the
        empirical covariance, which must then be nonsingular (n_c > d and no collinear features).
      ridge: relative diagonal loading for shrinkage="ridge" (ignored otherwise).
      dtype: float64 (default) or float32 for the fit arithmetic and the stored eigenvectors.

    Returns:
      GaussianParams with thin factors when every class has fewer examples than dimensions.
    """
    dtype = check_dtype(dtype)
    features = as_matrix("features", features)
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match features, "
                         f"got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]; "
                         "drop unlabelled (-1) examples and check num_classes.")
    if shrinkage not in SHRINKAGE_METHODS:
        raise ValueError(f"shrinkage must be one of {SHRINKAGE_METHODS}, got {shrinkage!r}.")
    if shrinkage == "ridge" and not ridge > 0:
        raise ValueError(f"ridge must be > 0 with shrinkage='ridge', got {ridge}.")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0)[:10].tolist()} have no training examples; "
                         "every class needs a mean (check labels and num_classes).")
    if not tied and (counts == 1).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 1)[:10].tolist()} have a single example, whose "
                         "covariance is zero; fit with tied=True (the `mahalanobis` scorer) or give every class more examples.")

    num_examples, dim = features.shape
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    means = np.stack([features[order[starts[c]:starts[c + 1]]].astype(np.float64).mean(axis=0)
                      for c in range(num_classes)])
    with jax.enable_x64(True):
        if tied:
            return _fit_tied(features, labels, means, counts, shrinkage, ridge, dtype)
        if counts.max() < dim:
            return _fit_per_class_thin(features, order, starts, means, counts, shrinkage, ridge, dtype)
        return _fit_per_class_full(features, order, starts, means, counts, shrinkage, ridge, dtype)


def _log_det(variances: np.ndarray, complement: np.ndarray, dim: int) -> np.ndarray:
    rank = variances.shape[-1]
    log_det = np.sum(np.log(variances), axis=-1)
    return log_det + (dim - rank) * np.log(complement) if rank < dim else log_det


def _fit_tied(features, labels, means, counts, shrinkage, ridge, dtype) -> GaussianParams:
    dim = features.shape[1]
    scatter, beta_sum = _scatter(features, labels, means, min(_SCATTER_CHUNK_ROWS, len(features)), dtype)
    components, variances, complement, coef = jax.device_get(
        _fit_full(scatter, beta_sum, features.shape[0], ridge, method=shrinkage, dtype=dtype))
    _check_nonsingular(variances, complement, dim, dtype, shrinkage, "The tied")
    variances, complement = np.asarray(variances, np.float64)[None], np.asarray(complement, np.float64)[None]
    log_det = _log_det(variances, complement, dim)
    return GaussianParams(
        means=means, components=np.asarray(components, dtype)[None], variances=variances,
        complement_variance=complement, log_dets=np.repeat(log_det, len(counts)), counts=counts, tied=True,
        shrinkage=shrinkage, shrinkage_coefs=np.asarray(coef, np.float64)[None])


# Eigenproblems up to this size run LAPACK single-threaded (see _lapack_threads_for).
_SINGLE_THREAD_EIGH_MAX = 2048


def _lapack_threads_for(size: int):
    """Runs CPU LAPACK (which jax's CPU eigh calls) on one thread for small per-class eigenproblems.

    Threading gains nothing at size ~ 500, and on a busy machine OpenBLAS's spin-waiting threads stalled
    single 500 x 500 eigh calls for seconds (measured: 0.03 s single-threaded vs up to 3 s threaded).
    Large problems (a tied 6144 x 6144 covariance) keep every thread.
    """
    if threadpool_limits is None or size > _SINGLE_THREAD_EIGH_MAX:
        return contextlib.nullcontext()
    # jaxlib's CPU LAPACK is SciPy's, loaded on the first eigh: load it now so that the limit reaches it.
    import scipy.linalg  # noqa: F401  (scipy is a jax dependency)
    return threadpool_limits(limits=1, user_api="blas")


def _fit_per_class_thin(features, order, starts, means, counts, shrinkage, ridge, dtype) -> GaussianParams:
    num_classes, dim = means.shape
    rows = int(counts.max())
    components = np.empty((num_classes, rows, dim), dtype)
    variances = np.empty((num_classes, rows), np.float64)
    complement, coefs = np.empty(num_classes), np.empty(num_classes)
    with _lapack_threads_for(rows):
        for c in range(num_classes):
            class_features = features[order[starts[c]:starts[c + 1]]]
            outputs = jax.device_get(_fit_thin(
                padded_chunk(class_features, 0, len(class_features), rows), means[c], np.int64(counts[c]),
                ridge, method=shrinkage, dtype=dtype))
            components[c], variances[c], complement[c], coefs[c] = outputs
            _check_nonsingular(variances[c], complement[c], dim, dtype, shrinkage,
                               f"Class {c}'s ({counts[c]} examples, {dim} dims)")
    return GaussianParams(
        means=means, components=components, variances=variances, complement_variance=complement,
        log_dets=_log_det(variances, complement, dim), counts=counts, tied=False, shrinkage=shrinkage,
        shrinkage_coefs=coefs)


def _fit_per_class_full(features, order, starts, means, counts, shrinkage, ridge, dtype) -> GaussianParams:
    num_classes, dim = means.shape
    rows = min(_SCATTER_CHUNK_ROWS, int(counts.max()))  # one chunk shape for all classes: one compilation
    components = np.empty((num_classes, dim, dim), dtype)
    variances = np.empty((num_classes, dim), np.float64)
    complement, coefs = np.empty(num_classes), np.empty(num_classes)
    with _lapack_threads_for(dim):
        for c in range(num_classes):
            class_features = features[order[starts[c]:starts[c + 1]]]
            scatter, beta_sum = _scatter(class_features, np.zeros(len(class_features), np.int64),
                                         means[c:c + 1], rows, dtype)
            components[c], variances[c], complement[c], coefs[c] = jax.device_get(
                _fit_full(scatter, beta_sum, counts[c], ridge, method=shrinkage, dtype=dtype))
            _check_nonsingular(variances[c], complement[c], dim, dtype, shrinkage,
                               f"Class {c}'s ({counts[c]} examples, {dim} dims)")
    return GaussianParams(
        means=means, components=components, variances=variances, complement_variance=complement,
        log_dets=_log_det(variances, complement, dim), counts=counts, tied=False, shrinkage=shrinkage,
        shrinkage_coefs=coefs)


@jax.jit
def _class_block_mahalanobis(x, origin, components, means, mean_projections, weights, inv_complement):
    """[M, B] squared Mahalanobis distances to one block of B classes.

    Woodbury form, with tau the complement variance (1 / tau = 0 when U_c is a full basis):
        (x - mu)^T Sigma^-1 (x - mu)
            = ||x - mu||^2 / tau + sum_j (u_j^T x - u_j^T mu)^2 (1 / lambda_j - 1 / tau).
    The block shares one [M, d] x [d, B * r] matmul: one large GEMM instead of B small ones (XLA runs
    matmuls inside a lax.map loop about 2x slower on CPU). Features and means are first shifted to a
    common origin (the mean of the class means), which removes the large shared offset of post-ReLU
    features before any cancellation.

    Args: x [M, d]; origin [d]; components [B * r, d] (class-major rows); means [B, d] (shifted);
      mean_projections [B, r] = U_c^T (mu_c - origin); weights [B, r]; inv_complement [B].
    """
    num_classes, rank = weights.shape
    x = x - origin
    projected = jnp.dot(x, components.T, precision=HIGHEST).reshape(x.shape[0], num_classes, rank)
    projected = projected - mean_projections
    within = jnp.sum(projected * projected * weights, axis=-1)
    to_means_sq = (jnp.sum(x * x, axis=1)[:, None] - 2.0 * jnp.dot(x, means.T, precision=HIGHEST)
                   + jnp.sum(means * means, axis=1)[None, :])
    # The exact value is ||r_perp||^2 / tau + sum_j p_j^2 / lambda_j >= 0; clip rounding below zero.
    return jnp.maximum(inv_complement * jnp.maximum(to_means_sq, 0.0) + within, 0.0)


@jax.jit
def _tied_mahalanobis(x, origin, whitened_means, whitening):
    """[M, C] squared Mahalanobis distances under one shared full-rank covariance, via whitening once."""
    whitened = jnp.dot(x - origin, whitening, precision=HIGHEST)
    cross = jnp.dot(whitened, whitened_means.T, precision=HIGHEST)
    distances = (jnp.sum(whitened ** 2, axis=1)[:, None] - 2.0 * cross
                 + jnp.sum(whitened_means ** 2, axis=1)[None, :])
    return jnp.maximum(distances, 0.0)


def _class_blocks(params: GaussianParams, origin: np.ndarray, class_batch_size: int, dtype) -> list[tuple]:
    """Device-resident factors for _class_block_mahalanobis, one tuple per block of classes.

    The reshape of a block's components to [B * r, d] is free (no host copy).
    """
    full_basis = params.components.shape[1] == params.dim
    inv_complement = np.zeros(params.num_classes) if full_basis else 1.0 / params.complement_variance
    weights = 1.0 / params.variances - inv_complement[:, None]
    blocks = []
    for start, stop in chunks(params.num_classes, class_batch_size):
        components = params.components[start:stop]
        means = params.means[start:stop] - origin
        mean_projections = np.matmul(components, means[:, :, None])[:, :, 0]
        blocks.append(tuple(jnp.asarray(a, dtype) for a in (
            components.reshape(-1, params.dim), means, mean_projections, weights[start:stop], inv_complement[start:stop])))
    return blocks


def squared_mahalanobis(params: GaussianParams, features, *, chunk_size: int = 1024,
                        class_batch_size: int = 8, dtype=jnp.float64) -> np.ndarray:
    """[M, C] squared Mahalanobis distances (x - mu_c)^T Sigma_c^-1 (x - mu_c), chunked.

    Device memory: the factors (C * d * r floats) plus about chunk_size * class_batch_size * r floats
    per block. No matrix is inverted: per-class factors give Woodbury solves; a tied covariance whitens
    the features once.
    """
    dtype = check_dtype(dtype)
    features = as_matrix("features", features, dim=params.dim)
    chunk_size = min(check_chunk("chunk_size", chunk_size), features.shape[0])
    class_batch_size = check_chunk("class_batch_size", class_batch_size)
    origin_np = params.means.mean(axis=0)
    distances = np.empty((features.shape[0], params.num_classes), np.float64)
    with jax.enable_x64(True):
        origin = jnp.asarray(origin_np, dtype)
        if params.tied:
            if params.components.shape[1] != params.dim:
                raise ValueError("tied GaussianParams must hold a full eigenbasis; refit with fit_gaussians.")
            whitening_np = params.components[0].T / np.sqrt(params.variances[0])
            whitening = jnp.asarray(whitening_np, dtype)
            whitened_means = jnp.asarray((params.means - origin_np) @ whitening_np, dtype)

            def compute(x):
                return np.asarray(_tied_mahalanobis(x, origin, whitened_means, whitening))
        else:
            blocks = _class_blocks(params, origin_np, class_batch_size, dtype)

            def compute(x):
                # Dispatch every block before reading any back, so device work overlaps the transfers.
                pending = [_class_block_mahalanobis(x, origin, *block) for block in blocks]
                return np.concatenate([np.asarray(block_distances) for block_distances in pending], axis=1)

        for start, stop in chunks(features.shape[0], chunk_size):
            chunk = jnp.asarray(padded_chunk(features, start, stop, chunk_size), dtype)
            distances[start:stop] = compute(chunk)[:stop - start]
    return distances


def gaussian_log_densities(params: GaussianParams, features, *, use_logdet: bool = True,
                           chunk_size: int = 1024, class_batch_size: int = 8, dtype=jnp.float64) -> np.ndarray:
    """[M, C] log N(z; mu_c, Sigma_c) = -0.5 * (Mahalanobis_c + log((2 pi)^d det Sigma_c)).

    With use_logdet=False the log-determinant and the constant are dropped: -0.5 * Mahalanobis_c.
    """
    distances = squared_mahalanobis(params, features, chunk_size=chunk_size, class_batch_size=class_batch_size,
                                    dtype=dtype)
    return log_densities_from_distances(params, distances, use_logdet=use_logdet)


def log_densities_from_distances(params: GaussianParams, distances: np.ndarray, *, use_logdet: bool) -> np.ndarray:
    """gaussian_log_densities from squared_mahalanobis(params, features), computed once for both Eq. 2 scorers."""
    if not use_logdet:
        return -0.5 * distances
    return -0.5 * (distances + params.log_dets[None, :] + params.dim * math.log(2.0 * math.pi))


def gaussian_score(params: GaussianParams, features, *, use_logdet: bool = True, chunk_size: int = 1024,
                   class_batch_size: int = 8, dtype=jnp.float64) -> tuple[np.ndarray, np.ndarray]:
    """Winkens et al. Eq. 2: the log density under the most activated class Gaussian.

    score(z) = max_c log N(z; mu_c, Sigma_c). The paper writes 2x this log density (its Eq. 2 drops the
    -1/2); the scale does not change any ranking metric. use_logdet=False drops the log-determinant and
    constant, leaving max_c -0.5 * Mahalanobis_c.

    Returns:
      (scores [M] float64, classes [M] int: argmax_c, the "most activated Gaussian").
    """
    log_densities = gaussian_log_densities(params, features, use_logdet=use_logdet, chunk_size=chunk_size,
                                           class_batch_size=class_batch_size, dtype=dtype)
    classes = np.argmax(log_densities, axis=1)
    return np.take_along_axis(log_densities, classes[:, None], axis=1)[:, 0], classes


def mahalanobis_score(params_tied: GaussianParams, features, *, chunk_size: int = 1024,
                      dtype=jnp.float64) -> tuple[np.ndarray, np.ndarray]:
    """Lee et al. 2018: minus the smallest squared Mahalanobis distance to a class mean, tied covariance.

    Returns (scores [M], classes [M]: the nearest class). Requires fit_gaussians(..., tied=True).
    """
    if not params_tied.tied:
        raise ValueError("mahalanobis_score needs a tied covariance: fit with fit_gaussians(..., tied=True), "
                         "or use gaussian_score for per-class covariances.")
    distances = squared_mahalanobis(params_tied, features, chunk_size=chunk_size, dtype=dtype)
    classes = np.argmin(distances, axis=1)
    return -np.take_along_axis(distances, classes[:, None], axis=1)[:, 0], classes


# ----------------------------------------------------------------------------------------------------
# The registered scorers.


def class_distances(params: GaussianParams, features, ctx: FitContext) -> np.ndarray:
    """[M, C] squared Mahalanobis distances of one scored set to the class Gaussians of `class_gaussians`,
    computed once per set: gaussian and gaussian_no_logdet read the per-class ones, mahalanobis and rmds
    the tied ones (the expensive part of scoring at the paper's 6144-D features)."""
    return ctx.for_this_set(f"squared_mahalanobis/tied={params.tied}",
                            lambda: squared_mahalanobis(params, features["pre_logits"]))


def _max_class(log_densities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = np.argmax(log_densities, axis=1)
    return np.take_along_axis(log_densities, classes[:, None], axis=1)[:, 0], classes


def class_gaussians(train, ctx: FitContext, *, tied: bool) -> GaussianParams:
    """Per-class (or tied) Gaussians of the training pre-logits, fitted once per evaluation."""
    ood = ctx.config.ood
    return ctx.shared(f"gaussians/tied={tied}", lambda: fit_gaussians(
        train["pre_logits"], train["labels"], ctx.num_classes, tied=tied, shrinkage=ood.shrinkage, ridge=ood.ridge))


@register
class Gaussian(Scorer):
    name = "gaussian"
    rank = 0
    description = "Eq. 2: max_c log N(f(x); mu_c, Sigma_c), per-class covariance (shrinkage: ood.shrinkage)"

    def fit(self, train, ctx):
        return class_gaussians(train, ctx, tied=False)

    def score(self, fitted, features, ctx):
        return _max_class(log_densities_from_distances(fitted, class_distances(fitted, features, ctx), use_logdet=True))


@register
class GaussianNoLogdet(Gaussian):
    name = "gaussian_no_logdet"
    rank = 1
    description = "Eq. 2 without the log-determinant (ablation)"

    def score(self, fitted, features, ctx):
        return _max_class(log_densities_from_distances(fitted, class_distances(fitted, features, ctx), use_logdet=False))


@register
class Mahalanobis(Scorer):
    name = "mahalanobis"
    rank = 2
    description = "Lee et al. 2018: minus the smallest Mahalanobis distance, tied covariance"

    def fit(self, train, ctx):
        return class_gaussians(train, ctx, tied=True)

    def score(self, fitted, features, ctx):
        return _max_class(-class_distances(fitted, features, ctx))

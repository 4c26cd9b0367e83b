"""Post-hoc OOD scores from extracted features: class-conditional Gaussians, Mahalanobis, MSP, energy,
ODIN and k-nearest neighbours.

Convention: a higher score means "more in-distribution". Scorers take features already extracted from a
model (numpy or JAX arrays): `pre_logits` [N, d] for the density and distance scores, `logits` [N, k]
for the softmax-based ones; only ODIN needs the model itself.

Precision. The Gaussian scores sum d ~ 6144 squared, whitened terms and a log-determinant of the same
size, and the covariance eigenvalues they divide by span many orders of magnitude, so fitting and scoring
run in float64 by default (under `jax.enable_x64`, without changing the caller's global setting). Pass
`dtype=jnp.float32` on accelerators without fast float64 (TPUs, consumer GPUs); every matmul asks for
`Precision.HIGHEST` so that GPUs (TF32) and TPUs (bf16) do not silently drop to lower precision. kNN
compares unit vectors with one dot product and defaults to float32 (HIGHEST), like faiss.

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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

try:  # Optional (a scikit-learn dependency): only used to keep small LAPACK calls single-threaded.
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

HIGHEST = jax.lax.Precision.HIGHEST
SHRINKAGE_METHODS = ("ledoit_wolf", "ridge", "none")
# Rows per device call when accumulating a d x d scatter matrix (bounds memory to chunk x d floats).
_SCATTER_CHUNK_ROWS = 4096


# ----------------------------------------------------------------------------------------------------
# Input validation.


def _as_matrix(name: str, array, *, dim: int | None = None) -> np.ndarray:
    """Returns `array` as a finite, non-empty numpy [N, D] array, or raises a ValueError naming the fix."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_examples, dim], got shape {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); pass at least one example of dim >= 1.")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has dim {array.shape[1]} but the fitted model expects {dim}; "
                         "score the same feature layer the model was fitted on.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued, got dtype {array.dtype}.")
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} non-finite (NaN/inf) values in "
                         f"{bad_rows.size} row(s), first rows {bad_rows[:10].tolist()}; "
                         "fix the feature extraction or drop those examples.")
    return array


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}.")
    return dtype


def _check_chunk(name: str, value: int) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def _chunks(num: int, chunk_size: int):
    for start in range(0, num, chunk_size):
        yield start, min(start + chunk_size, num)


def _padded_chunk(array: np.ndarray, start: int, stop: int, rows: int) -> np.ndarray:
    """Rows [start, stop) zero-padded to `rows`, so every device call has one shape (one compilation)."""
    chunk = array[start:stop]
    if chunk.shape[0] == rows:
        return chunk
    return np.concatenate([chunk, np.zeros((rows - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])


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
    for start, stop in _chunks(features.shape[0], rows):
        valid = np.arange(rows) < stop - start
        chunk_scatter, chunk_beta = _scatter_chunk(
            _padded_chunk(features, start, stop, rows), _padded_chunk(labels, start, stop, rows), device_means,
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
      num_classes: C. Every class needs >= 1 example, and >= 2 unless `tied` (a per-class covariance
        from one example is zero); an empty class has no mean and raises ValueError.
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
    dtype = _check_dtype(dtype)
    features = _as_matrix("features", features)
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
                         "covariance is zero; use tied=True or more examples per class.")

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
                _padded_chunk(class_features, 0, len(class_features), rows), means[c], np.int64(counts[c]),
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
    for start, stop in _chunks(params.num_classes, class_batch_size):
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
    dtype = _check_dtype(dtype)
    features = _as_matrix("features", features, dim=params.dim)
    chunk_size = min(_check_chunk("chunk_size", chunk_size), features.shape[0])
    class_batch_size = _check_chunk("class_batch_size", class_batch_size)
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

        for start, stop in _chunks(features.shape[0], chunk_size):
            chunk = jnp.asarray(_padded_chunk(features, start, stop, chunk_size), dtype)
            distances[start:stop] = compute(chunk)[:stop - start]
    return distances


def gaussian_log_densities(params: GaussianParams, features, *, use_logdet: bool = True,
                           chunk_size: int = 1024, class_batch_size: int = 8, dtype=jnp.float64) -> np.ndarray:
    """[M, C] log N(z; mu_c, Sigma_c) = -0.5 * (Mahalanobis_c + log((2 pi)^d det Sigma_c)).

    With use_logdet=False the log-determinant and the constant are dropped: -0.5 * Mahalanobis_c.
    """
    distances = squared_mahalanobis(params, features, chunk_size=chunk_size, class_batch_size=class_batch_size,
                                    dtype=dtype)
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
# Logit-based scores.


def msp_score(logits) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""
    logits = _as_matrix("logits", logits)
    with jax.enable_x64(True):
        return np.asarray(jnp.max(jax.nn.softmax(jnp.asarray(logits, jnp.float64), axis=-1), axis=-1))


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T * logsumexp(logits / T) (Liu et al. 2020)."""
    logits = _as_matrix("logits", logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    with jax.enable_x64(True):
        scaled = jnp.asarray(logits, jnp.float64) / temperature
        return np.asarray(temperature * jax.nn.logsumexp(scaled, axis=-1))


def odin_score(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, *,
               temperature: float = 1000.0, epsilon: float = 0.0014) -> jax.Array:
    """ODIN (Liang et al. 2018): temperature-scaled max softmax after a small input perturbation.

    x~ = x - epsilon * sign(-grad_x log S_y(x; T)), y the class predicted on x, and the score is
    max softmax(logits(x~) / T). The defaults are ODIN's published T and epsilon, kept fixed: tuning them
    on OOD data is not allowed here. epsilon is in the units of `images`; 0.0014 was set for [0, 1] pixels
    (ODIN divides its gradient by the normalisation std, i.e. perturbs [0, 1] pixels), so pass images in
    [0, 1] to a logits_fn that normalises internally.

    Pure JAX, so it can be wrapped in jax.jit (with logits_fn closed over). The batch gradient is
    per-example only if logits_fn treats examples independently (e.g. BatchNorm in inference mode).

    Args:
      logits_fn: float images [B, H, W, C] -> logits [B, k].
      images: float images [B, H, W, C].
    Returns:
      [B] scores (a jax.Array).
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point, got {images.dtype}; convert uint8 to float first.")

    def total_log_confidence(x):
        log_probs = jax.nn.log_softmax(logits_fn(x) / temperature, axis=-1)
        predicted = jax.lax.stop_gradient(jnp.argmax(log_probs, axis=-1))
        return jnp.sum(jnp.take_along_axis(log_probs, predicted[:, None], axis=-1))

    gradient = jax.grad(total_log_confidence)(images)
    perturbed = images - epsilon * jnp.sign(-gradient)
    return jnp.max(jax.nn.softmax(logits_fn(perturbed) / temperature, axis=-1), axis=-1)


# ----------------------------------------------------------------------------------------------------
# k nearest neighbours.


@dataclasses.dataclass(frozen=True)
class KNNIndex:
    """L2-normalised training features [N, d] (float32) for kNN scoring."""

    features: np.ndarray


def _l2_normalise(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float64)
    # An all-zero feature (possible after a ReLU) stays zero instead of becoming NaN.
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def fit_knn(train_features) -> KNNIndex:
    """Normalises and stores the training features (Sun et al. 2022 compare unit vectors)."""
    train_features = _as_matrix("train_features", train_features)
    return KNNIndex(features=_l2_normalise(train_features).astype(np.float32))


@jax.jit
def _squared_distances(x, train, train_norms_sq):
    # Squared distances from norms and one matmul; norms are 1 except for all-zero features (norm 0).
    return (jnp.sum(x * x, axis=1)[:, None] + train_norms_sq[None, :]
            - 2.0 * jnp.dot(x, train.T, precision=HIGHEST))


def _kth_neighbour_distance(x, train, train_norms_sq, *, k):
    # The k-th smallest per row with numpy's O(N) introselect: XLA:CPU's top_k sorts the whole row and
    # was 40x slower (90 s for 10,000 x 50,000 at d = 64).
    distances_sq = np.asarray(_squared_distances(x, train, train_norms_sq))
    kth_distance_sq = np.partition(distances_sq, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(kth_distance_sq, 0.0))


def knn_score(index: KNNIndex, features, k: int = 50, *, chunk_size: int = 1024,
              dtype=jnp.float32) -> np.ndarray:
    """Minus the distance from each normalised feature to its k-th nearest normalised training feature.

    Sun et al. 2022 ("Out-of-distribution detection with deep nearest neighbors"), k=50 for CIFAR-10.
    The [chunk_size, N] similarity block is the peak memory.
    """
    dtype = _check_dtype(dtype)
    features = _as_matrix("features", features, dim=index.features.shape[1])
    num_train = index.features.shape[0]
    if not 1 <= int(k) <= num_train:
        raise ValueError(f"k must be in [1, {num_train}] (the number of training features), got {k}.")
    chunk_size = min(_check_chunk("chunk_size", chunk_size), features.shape[0])
    normalised = _l2_normalise(features)
    scores = np.empty(features.shape[0], np.float64)
    with jax.enable_x64(True):
        train = jnp.asarray(index.features, dtype)
        train_norms_sq = jnp.sum(train * train, axis=1)
        for start, stop in _chunks(features.shape[0], chunk_size):
            chunk = jnp.asarray(_padded_chunk(normalised, start, stop, chunk_size), dtype)
            distances = _kth_neighbour_distance(chunk, train, train_norms_sq, k=int(k))
            scores[start:stop] = -np.asarray(distances)[:stop - start]
    return scores

"""Deep k-nearest neighbours (Sun et al. 2022) on L2-normalised penultimate features."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, check_chunk, check_dtype, chunks, padded_chunk, register

HIGHEST = jax.lax.Precision.HIGHEST


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
    train_features = as_matrix("train_features", train_features)
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
    dtype = check_dtype(dtype)
    features = as_matrix("features", features, dim=index.features.shape[1])
    num_train = index.features.shape[0]
    if not 1 <= int(k) <= num_train:
        raise ValueError(f"k must be in [1, {num_train}] (the number of training features), got {k}.")
    chunk_size = min(check_chunk("chunk_size", chunk_size), features.shape[0])
    normalised = _l2_normalise(features)
    scores = np.empty(features.shape[0], np.float64)
    with jax.enable_x64(True):
        train = jnp.asarray(index.features, dtype)
        train_norms_sq = jnp.sum(train * train, axis=1)
        for start, stop in chunks(features.shape[0], chunk_size):
            chunk = jnp.asarray(padded_chunk(normalised, start, stop, chunk_size), dtype)
            distances = _kth_neighbour_distance(chunk, train, train_norms_sq, k=int(k))
            scores[start:stop] = -np.asarray(distances)[:stop - start]
    return scores


@register
class KNN(Scorer):
    name = "knn"
    rank = 20
    description = "Sun et al. 2022: minus the distance to the k-th nearest normalised training feature (ood.knn_k)"

    def fit(self, train, ctx):
        return fit_knn(train["pre_logits"])

    def score(self, fitted, features, ctx):
        return knn_score(fitted, features["pre_logits"], k=ctx.config.ood.knn_k), None

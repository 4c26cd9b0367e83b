"""Training losses: NT-Xent (Eq. 1 of Winkens et al. / SimCLR) and label-smoothed cross-entropy.

Both are computed in float32 over the *global* batch: under a global-view `jax.jit` with a
batch-sharded input, the similarity matrix below spans every device, which gives SimCLR's
cross-device negatives without hand-written collectives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float, mask: jax.Array | None = None):
    """Normalised-temperature cross-entropy over 2N views (Eq. 1).

    z1[i] and z2[i] are the projections of two views of example i. For each of the 2N anchors the
    positive is its partner view and the other 2N - 2 views are negatives:
        l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau),
    with sim the cosine similarity; the loss is the mean over all 2N anchors.

    `mask` (bool [N]) drops padded examples both as anchors and as negatives.

    Returns (loss, accuracy), where accuracy is the fraction of anchors whose positive is the most
    similar of the other 2N - 1 views.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent expects two [N, D] arrays of equal shape, got {z1.shape} and {z2.shape}")
    n = z1.shape[0]
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    sim = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
    valid = jnp.ones((2 * n,), bool) if mask is None else jnp.concatenate([mask, mask]).astype(bool)
    idx = jnp.arange(2 * n)
    positive = (idx + n) % (2 * n)
    not_self = idx[:, None] != idx[None, :]
    candidates = not_self & valid[None, :]
    logits = jnp.where(candidates, sim, -jnp.inf)
    log_prob = logits[idx, positive] - jax.nn.logsumexp(logits, axis=-1)
    weights = valid.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = -jnp.where(valid, log_prob, 0.0).sum() / denom
    correct = jnp.argmax(logits, axis=-1) == positive
    accuracy = (correct * weights).sum() / denom
    return loss, accuracy


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float,
                           mask: jax.Array | None = None):
    """Cross-entropy against (1 - eps) * one_hot + eps / k targets; returns (loss, accuracy)."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    weights = jnp.ones_like(per_example) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (per_example * weights).sum() / denom
    accuracy = ((jnp.argmax(logits, -1) == labels) * weights).sum() / denom
    return loss, accuracy

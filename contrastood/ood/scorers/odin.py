"""ODIN (Liang et al. 2018): temperature scaling and an input perturbation, with the network in the loop."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from contrastood.ood.scorers.base import Scorer, register


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


@register
class Odin(Scorer):
    name = "odin"
    rank = 11
    needs = ("odin", "logits")
    in_network = True
    description = "ODIN, T = ood.odin_temperature, epsilon = ood.odin_epsilon, fixed (never tuned on OOD data)"

    def network_feature(self, logits_fn, images, config):
        return odin_score(logits_fn, images, temperature=config.ood.odin_temperature, epsilon=config.ood.odin_epsilon)

    def network_cache_key(self, config) -> str:
        return f"T={config.ood.odin_temperature}|eps={config.ood.odin_epsilon}"

    def score(self, fitted, features, ctx):
        return features["odin"], features["logits"].argmax(-1)

"""Scores from the logits alone: maximum softmax probability and energy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, register


def msp_score(logits) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""
    logits = as_matrix("logits", logits)
    with jax.enable_x64(True):
        return np.asarray(jnp.max(jax.nn.softmax(jnp.asarray(logits, jnp.float64), axis=-1), axis=-1))


def energy_score(logits, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy T * logsumexp(logits / T) (Liu et al. 2020)."""
    logits = as_matrix("logits", logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    with jax.enable_x64(True):
        scaled = jnp.asarray(logits, jnp.float64) / temperature
        return np.asarray(temperature * jax.nn.logsumexp(scaled, axis=-1))


@register
class MaxSoftmax(Scorer):
    name = "msp"
    rank = 10
    needs = ("logits",)
    description = "Hendrycks & Gimpel 2017: maximum softmax probability"

    def score(self, fitted, features, ctx):
        return msp_score(features["logits"]), features["logits"].argmax(-1)


@register
class Energy(Scorer):
    name = "energy"
    rank = 12
    needs = ("logits",)
    description = "Liu et al. 2020: T * logsumexp(logits / T), T = 1"

    def score(self, fitted, features, ctx):
        return energy_score(features["logits"]), features["logits"].argmax(-1)

"""GEN, the generalized entropy score (Liu et al. 2023, "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection").

    G_gamma(p) = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma,        score = -G_gamma(p),

with p = softmax(logits) over all k classes (not renormalised over the top M) and the sum over the M
largest probabilities. G is an entropy-like uncertainty (0 for a one-hot p), so its negation is higher
for confident, in-distribution-like predictions. gamma = ood.gen_gamma (the paper's 0.1); M =
ood.gen_top_m, 0 meaning all k classes (the paper used M = 100 on ImageNet-1K, where k = 1000).

Numerics (float64): each term is exp(gamma * (log p + log(1 - p))) with log p from a log-softmax and
log(1 - p) = log(-expm1(log p)), so neither a probability that underflows to 0 nor one that rounds to 1
produces NaN, and 1 - p keeps its relative precision when p is close to 1.
"""
from __future__ import annotations

import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, check_chunk, chunks, register

_CHUNK_ROWS = 8192


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def gen_score(logits, gamma: float = 0.1, top_m: int = 0, *, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """[N] float64: minus the generalized entropy of the top-M softmax probabilities.

    Args:
      logits: [N, k] logits.
      gamma: the exponent, > 0.
      top_m: M, in [1, k]; 0 means all k classes.
    """
    logits = as_matrix("logits", logits)
    num_classes = logits.shape[1]
    if not gamma > 0:
        raise ValueError(f"GEN's gamma must be > 0, got {gamma}; set ood.gen_gamma (the paper uses 0.1).")
    if int(top_m) != top_m or not 0 <= top_m <= num_classes:
        raise ValueError(f"GEN's top M must be an integer in [0, {num_classes}] (the number of classes; 0 = all), "
                         f"got {top_m}; set ood.gen_top_m accordingly.")
    top_m = int(top_m) or num_classes
    chunk_size = check_chunk("chunk_size", chunk_size)
    scores = np.empty(logits.shape[0], np.float64)
    for start, stop in chunks(logits.shape[0], chunk_size):
        chunk = logits[start:stop].astype(np.float64)
        if top_m < num_classes:  # the M largest logits are the M largest probabilities
            top = np.argpartition(chunk, num_classes - top_m, axis=1)[:, num_classes - top_m:]
        log_probs = _log_softmax(chunk)
        if top_m < num_classes:
            log_probs = np.take_along_axis(log_probs, top, axis=1)
        with np.errstate(divide="ignore"):  # log(1 - p) = -inf where p rounds to 1: the term is then 0
            log_complement = np.log(-np.expm1(log_probs))
        scores[start:stop] = -np.sum(np.exp(gamma * (log_probs + log_complement)), axis=1)
    return scores


@register
class GeneralizedEntropy(Scorer):
    name = "gen"
    rank = 33
    needs = ("logits",)
    description = ("Liu et al. 2023 (GEN): -sum over the top-M softmax p of p^g (1-p)^g "
                   "(g = ood.gen_gamma, M = ood.gen_top_m, 0 = all)")

    def score(self, fitted, features, ctx):
        ood = ctx.config.ood
        logits = features["logits"]
        return gen_score(logits, gamma=ood.gen_gamma, top_m=ood.gen_top_m), np.argmax(logits, axis=1)

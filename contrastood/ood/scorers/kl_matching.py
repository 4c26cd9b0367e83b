"""KL matching (Hendrycks et al. 2022, "Scaling Out-of-Distribution Detection for Real-World Settings").

Each class c that the classifier predicts for at least one training example gets a template: the mean
posterior of the training examples *predicted* (argmax of the logits) as c, not of those labelled c,
so no labels are used,

    d_c = mean_{x' in train, argmax p(x') = c} p(. | x'),

and the score is minus the divergence from an example's posterior to the closest template,

    score(x) = -min_c KL(p(. | x) || d_c),      KL(p || q) = sum_j p_j (log p_j - log q_j).

The paper builds the templates on held-out validation data; this package's scorers are fitted on the
training split's features, so the templates come from the training examples. A class that no training
example is predicted as has no template and is skipped; if no class has one, fit() raises.

Numerics (float64): templates are kept as logs, log d_cj = logsumexp_i(log p_ij) - log n_c over the
examples predicted as c, so a coordinate whose probabilities all underflow still has a finite log and
every divergence stays finite. The divergences of a block of examples to all templates are one matmul,
sum_j p_j log p_j - p @ log(d)^T, chunked over examples.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, check_chunk, chunks, register

_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class KLTemplates:
    """log_templates: [T, k] log mean posteriors; classes: [T] the predicted class of each template."""

    log_templates: np.ndarray
    classes: np.ndarray


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def fit_kl_templates(train_logits, *, chunk_size: int = _CHUNK_ROWS) -> KLTemplates:
    """Templates from training logits [N, k]: one per class predicted for >= 1 example."""
    train_logits = as_matrix("train logits", train_logits)
    chunk_size = check_chunk("chunk_size", chunk_size)
    num_classes = train_logits.shape[1]
    predicted = np.argmax(train_logits, axis=1)
    counts = np.bincount(predicted, minlength=num_classes)
    classes = np.flatnonzero(counts)
    if classes.size == 0:  # pragma: no cover - as_matrix already refuses an empty split
        raise ValueError("KL matching has no template: no class is predicted for any training example; "
                         "fit on a non-empty training split.")
    # Log-sum-exp of log p over each class's examples, accumulated chunk by chunk: a running maximum
    # and the sum of exp(log p - maximum) per (template, coordinate).
    maximum = np.full((num_classes, num_classes), -np.inf)
    total = np.zeros((num_classes, num_classes))
    for start, stop in chunks(train_logits.shape[0], chunk_size):
        log_probs = _log_softmax(train_logits[start:stop].astype(np.float64))
        order = np.argsort(predicted[start:stop], kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(predicted[start:stop], minlength=num_classes))])
        for c in np.flatnonzero(np.diff(bounds)):
            rows = log_probs[order[bounds[c]:bounds[c + 1]]]
            chunk_max = rows.max(axis=0)
            new_max = np.maximum(maximum[c], chunk_max)
            total[c] = total[c] * np.exp(maximum[c] - new_max) + np.sum(np.exp(rows - new_max), axis=0)
            maximum[c] = new_max
    log_templates = maximum[classes] + np.log(total[classes]) - np.log(counts[classes])[:, None]
    return KLTemplates(log_templates=log_templates, classes=classes)


def kl_matching_divergences(templates: KLTemplates, logits, *, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """[N, T] KL(p(x) || d_t) to every template."""
    logits = as_matrix("logits", logits, dim=templates.log_templates.shape[1])
    chunk_size = check_chunk("chunk_size", chunk_size)
    divergences = np.empty((logits.shape[0], templates.classes.size), np.float64)
    for start, stop in chunks(logits.shape[0], chunk_size):
        log_probs = _log_softmax(logits[start:stop].astype(np.float64))
        probs = np.exp(log_probs)  # underflow to 0 is the right limit: 0 * log 0 = 0
        neg_entropy = np.sum(probs * log_probs, axis=1, keepdims=True)
        divergences[start:stop] = np.maximum(neg_entropy - probs @ templates.log_templates.T, 0.0)
    return divergences


def kl_matching_score(templates: KLTemplates, logits, *, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """[N] float64: minus the KL divergence to the nearest template."""
    return -kl_matching_divergences(templates, logits, chunk_size=chunk_size).min(axis=1)


@register
class KLMatching(Scorer):
    name = "kl_matching"
    rank = 35
    needs = ("logits",)
    description = ("Hendrycks et al. 2022 (KL matching): -min_c KL(p || d_c), d_c = mean softmax of the "
                   "training examples predicted as c")

    def fit(self, train, ctx):
        return fit_kl_templates(train["logits"])

    def score(self, fitted, features, ctx):
        logits = features["logits"]
        return kl_matching_score(fitted, logits), np.argmax(logits, axis=1)

"""ReAct, rectified activations (Sun et al. 2021, "ReAct: Out-of-distribution Detection With Rectified
Activations"), with the energy score.

    c = the p-th percentile of all training pre-logit activations (every entry of the [N, d] matrix),
    h~(x) = min(h(x), c) elementwise,   logits~ = h~(x) W + b,   score(x) = logsumexp_j logits~_j.

p = ood.react_percentile (the paper's 90). The paper estimates c on in-distribution data; here it comes
from the training split's pre-logits, the data every scorer is fitted on. Clipping only from above
truncates the rare, abnormally large activations that OOD inputs trigger, and the energy of the
recomputed logits then separates the two better than that of the raw logits. The predicted class is the
argmax of the rectified logits (the rectified network's prediction).

The percentile is numpy's default "linear" one, computed exactly without copying the whole
activation matrix once it exceeds `max_copy` entries (50,000 x 6144 float32 activations are 1.2 GB):
a sample brackets the two order statistics it needs, one chunked pass counts the entries below the
bracket and collects the (about 0.5%) inside it, and only those are partitioned; a bracket that missed
is widened and the pass repeated. Logits are recomputed in float64, chunk by chunk.
"""
from __future__ import annotations

import math

import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, check_chunk, chunks, register
from contrastood.ood.scorers.vim import head_parameters

_CHUNK_ROWS = 1024
_MAX_COPY = 1 << 24  # entries below which the percentile simply partitions a flat copy
_SAMPLE = 1 << 20


def _order_statistics_bracketed(values: np.ndarray, ranks: tuple[int, ...], chunk_rows: int, max_copy: int,
                                seed: int):
    """The order statistics `ranks` (0-based) of all entries of `values` [N, d], or None if brackets fail."""
    num = values.size
    rng = np.random.default_rng(seed)
    sample_size = min(_SAMPLE, num)
    sample = np.sort(values[rng.integers(0, values.shape[0], sample_size),
                            rng.integers(0, values.shape[1], sample_size)].astype(np.float64))
    low_fraction, high_fraction = min(ranks) / num, (max(ranks) + 1) / num
    margin = 2.5 / math.sqrt(sample_size)  # five standard deviations of a sample quantile, at worst
    for _ in range(4):
        low_index = math.floor((low_fraction - margin) * sample_size)
        high_index = math.ceil((high_fraction + margin) * sample_size)
        low = sample[low_index] if low_index >= 0 else -np.inf
        high = sample[high_index] if high_index < sample_size else np.inf
        below_low = at_most_low = below_high = at_most_high = 0
        inside, inside_count = [], 0
        for start, stop in chunks(values.shape[0], chunk_rows):
            chunk = values[start:stop].astype(np.float64)
            below_low += int(np.count_nonzero(chunk < low))
            at_most_low += int(np.count_nonzero(chunk <= low))
            below_high += int(np.count_nonzero(chunk < high))
            at_most_high += int(np.count_nonzero(chunk <= high))
            between = chunk[(chunk > low) & (chunk < high)]
            inside.append(between)
            inside_count += between.size
            if inside_count > max_copy:
                return None  # the bracket holds far more than expected: copy everything instead
        inside = np.concatenate(inside)
        found = []
        for rank in ranks:
            if below_low <= rank < at_most_low:
                found.append(low)
            elif at_most_low <= rank < below_high:
                found.append(None)
            elif below_high <= rank < at_most_high:
                found.append(high)
            else:
                break
        else:
            wanted = sorted({rank - at_most_low for rank, value in zip(ranks, found) if value is None})
            if wanted:
                inside = np.partition(inside, wanted)
            return tuple(float(inside[rank - at_most_low]) if value is None else float(value)
                         for rank, value in zip(ranks, found))
        margin *= 4.0
    return None


def activation_percentile(activations, percentile: float, *, chunk_rows: int = 4096, max_copy: int = _MAX_COPY,
                          seed: int = 0) -> float:
    """np.percentile(activations, percentile) (method "linear") over all entries of [N, d], in bounded memory."""
    activations = as_matrix("activations", activations)
    if not 0 <= percentile <= 100:
        raise ValueError(f"the ReAct percentile must be in [0, 100], got {percentile}; set ood.react_percentile.")
    chunk_rows = check_chunk("chunk_rows", chunk_rows)
    num = activations.size
    position = percentile / 100.0 * (num - 1)
    low_rank = min(int(math.floor(position)), num - 1)
    ranks = (low_rank, min(low_rank + 1, num - 1))
    found = None
    if num > max_copy:
        found = _order_statistics_bracketed(activations, ranks, chunk_rows, max_copy, seed)
    if found is None:
        flat = np.partition(activations.reshape(-1), sorted(set(ranks)))
        found = tuple(float(flat[rank]) for rank in ranks)
    low, high = found
    return low + (high - low) * (position - low_rank)


def react_score(threshold: float, features, kernel: np.ndarray, bias: np.ndarray, *,
                chunk_size: int = _CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(logsumexp of min(h, c) W + b [N] float64, argmax of those logits [N])."""
    features = as_matrix("pre_logits", features, dim=kernel.shape[0])
    chunk_size = check_chunk("chunk_size", chunk_size)
    kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    scores = np.empty(features.shape[0], np.float64)
    classes = np.empty(features.shape[0], np.int64)
    for start, stop in chunks(features.shape[0], chunk_size):
        logits = np.minimum(features[start:stop].astype(np.float64), threshold) @ kernel + bias
        maximum = logits.max(axis=1)
        scores[start:stop] = maximum + np.log(np.sum(np.exp(logits - maximum[:, None]), axis=1))
        classes[start:stop] = np.argmax(logits, axis=1)
    return scores, classes


@register
class ReAct(Scorer):
    name = "react"
    rank = 32
    description = ("Sun et al. 2021 (ReAct): energy of the logits recomputed from pre-logits clipped at the "
                   "ood.react_percentile-th percentile of the training activations")

    def fit(self, train, ctx):
        features = as_matrix("train pre_logits", train["pre_logits"])
        kernel, bias = head_parameters(ctx, features.shape[1], "react")
        return activation_percentile(features, ctx.config.ood.react_percentile), kernel, bias

    def score(self, fitted, features, ctx):
        threshold, kernel, bias = fitted
        return react_score(threshold, features["pre_logits"], kernel, bias)

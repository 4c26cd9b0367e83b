"""MaxLogit (Hendrycks et al. 2022, "Scaling Out-of-Distribution Detection for Real-World Settings").

score(x) = max_j l_j(x), the largest unnormalised logit. Unlike the maximum softmax probability it is
not squashed to [0, 1] and keeps the logit's scale, which the paper found better with many classes.
Higher means more in-distribution.
"""
from __future__ import annotations

import numpy as np

from contrastood.ood.scorers.base import Scorer, as_matrix, register


def max_logit_score(logits) -> tuple[np.ndarray, np.ndarray]:
    """(max_j l_j [N] float64, argmax_j l_j [N])."""
    logits = as_matrix("logits", logits)
    classes = np.argmax(logits, axis=1)
    scores = np.take_along_axis(logits, classes[:, None], axis=1)[:, 0].astype(np.float64)
    return scores, classes


@register
class MaxLogit(Scorer):
    name = "max_logit"
    rank = 34
    needs = ("logits",)
    description = "Hendrycks et al. 2022 (MaxLogit): the largest logit, max_j l_j"

    def score(self, fitted, features, ctx):
        return max_logit_score(features["logits"])

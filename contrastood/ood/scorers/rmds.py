"""Relative Mahalanobis distance (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance for Improving
Near-OOD Detection").

    MD_c(z) = (z - mu_c)^T Sigma^-1 (z - mu_c)       class means, one tied covariance (as `mahalanobis`)
    MD_0(z) = (z - mu_0)^T Sigma_0^-1 (z - mu_0)     one background Gaussian fitted to all training features
    score(z) = -min_c (MD_c(z) - MD_0(z))

Subtracting MD_0 removes the directions that the training data varies along regardless of class, which
dominate MD_c for near-OOD inputs. The predicted class is argmin_c MD_c (MD_0 does not depend on c).

Both Gaussians come from `gaussian.fit_gaussians` with the configured `ood.shrinkage` / `ood.ridge`
(the paper uses the empirical covariances, i.e. shrinkage="none"): the tied class Gaussians are the ones
`mahalanobis` fits (shared through `ctx.shared`), and the background Gaussian is the one-class "tied"
fit, whose covariance is that of all training features around their mean. Distances are float64 and
chunked (see `gaussian.squared_mahalanobis`).
"""
from __future__ import annotations

import numpy as np

from contrastood.ood.scorers.base import FitContext, Scorer, as_matrix, register
from contrastood.ood.scorers.gaussian import (GaussianParams, class_distances, class_gaussians, fit_gaussians,
                                              squared_mahalanobis)


def fit_background_gaussian(features, *, shrinkage: str = "ledoit_wolf", ridge: float = 1e-6) -> GaussianParams:
    """N(mu_0, Sigma_0) of all features [N, d], labels ignored."""
    features = as_matrix("features", features)
    return fit_gaussians(features, np.zeros(features.shape[0], np.int64), 1, tied=True, shrinkage=shrinkage,
                         ridge=ridge)


def background_gaussian(train, ctx: FitContext) -> GaussianParams:
    """The background Gaussian of the training pre-logits, fitted once per evaluation."""
    ood = ctx.config.ood
    return ctx.shared("gaussians/background", lambda: fit_background_gaussian(
        train["pre_logits"], shrinkage=ood.shrinkage, ridge=ood.ridge))


def relative_mahalanobis_score(params_tied: GaussianParams, background: GaussianParams, features, *,
                               chunk_size: int = 1024, class_distances: np.ndarray | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
    """(-min_c (MD_c - MD_0) [M] float64, argmin_c MD_c [M]). `class_distances`: MD_c if already computed."""
    if not params_tied.tied:
        raise ValueError("relative Mahalanobis needs tied class Gaussians: fit them with "
                         "fit_gaussians(..., tied=True).")
    if background.num_classes != 1 or not background.tied:
        raise ValueError("the background Gaussian must be a single tied Gaussian: fit it with "
                         "fit_background_gaussian(features).")
    if background.dim != params_tied.dim:
        raise ValueError(f"the background Gaussian has dim {background.dim} but the class Gaussians {params_tied.dim}; "
                         "fit both on the same feature layer.")
    if class_distances is None:
        class_distances = squared_mahalanobis(params_tied, features, chunk_size=chunk_size)
    background_distances = squared_mahalanobis(background, features, chunk_size=chunk_size)[:, 0]
    classes = np.argmin(class_distances, axis=1)
    nearest = np.take_along_axis(class_distances, classes[:, None], axis=1)[:, 0]
    return -(nearest - background_distances), classes


@register
class RelativeMahalanobis(Scorer):
    name = "rmds"
    rank = 30
    description = ("Ren et al. 2021 (RMDS): -min_c (MD_c - MD_0), tied class covariance minus one background "
                   "Gaussian of all training features")

    def fit(self, train, ctx):
        return class_gaussians(train, ctx, tied=True), background_gaussian(train, ctx)

    def score(self, fitted, features, ctx):
        params_tied, background = fitted
        return relative_mahalanobis_score(params_tied, background, features["pre_logits"],
                                          class_distances=class_distances(params_tied, features, ctx))

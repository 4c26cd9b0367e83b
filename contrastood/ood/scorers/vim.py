"""ViM, virtual-logit matching (Wang et al. 2022, "ViM: Out-Of-Distribution with Virtual-logit Matching").

With the head logits = x W + b (W [d, k]):
  - origin u = -pinv(W^T) b, the (minimum-norm) point whose logits are all zero;
  - principal space P: the top-D eigenvectors of the uncentred second moment of the training features
    shifted to u, (1/N) sum (x - u)(x - u)^T (the paper "centres" the features at u, not at their mean);
  - residual r(x) = ||(x - u)^{P-perp}||, the norm of the part of x - u outside P;
  - alpha = mean_train max_j l_j / mean_train r, so that the virtual logit alpha r matches the scale of
    the real logits on the training set.
The paper's OOD score is the softmax probability of the virtual logit l_0 = alpha r among
[l_1 .. l_k, l_0]: p_0 = e^{l_0} / (sum_j e^{l_j} + e^{l_0}). This scorer returns
log((1 - p_0) / p_0) = logsumexp_j l_j - alpha r, a strictly decreasing function of p_0 (so the same
ranking, with higher = more in-distribution) that stays finite and well-conditioned where p_0 saturates.

D = ood.vim_dim, or with 0 the paper's rule for the feature size N: D = 1000 for N >= 1500, D = 512 for
768 <= N < 1500 (the settings of the paper's ResNet/BiT/RepVGG and ViT/DeiT/Swin backbones), and
D = N // 2 below 768, a size the paper does not cover (OpenOOD uses 256 for a 512-d ResNet-18).

Precision and memory: float64 throughout. The d x d moment matrix is accumulated over row chunks
(chunk x d floats on the device at a time) and decomposed on the device; residuals are computed from
whichever of the two subspaces is smaller, P (r^2 = ||x - u||^2 - ||P^T (x - u)||^2) or its complement,
and that basis, d x min(D, d - D) floats, is all that is stored.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from contrastood.ood.scorers.base import (FitContext, Scorer, as_matrix, check_chunk, chunks, padded_chunk,
                                          register)

HIGHEST = jax.lax.Precision.HIGHEST
_CHUNK_ROWS = 4096


def head_parameters(ctx: FitContext, dim: int, scorer: str) -> tuple[np.ndarray, np.ndarray]:
    """The classification head (W [d, k], b [k]) from ctx, as float64, checked against the feature dim."""
    if ctx.head_kernel is None or ctx.head_bias is None:
        raise ValueError(f"{scorer} needs the classification head: pass head_kernel [d, k] and head_bias [k] "
                         "(logits = pre_logits @ head_kernel + head_bias) in the FitContext.")
    kernel = as_matrix("head_kernel", ctx.head_kernel).astype(np.float64)
    bias = np.asarray(ctx.head_bias, np.float64)
    if kernel.shape[0] != dim:
        raise ValueError(f"head_kernel has shape {kernel.shape} but the pre-logits have dim {dim}; pass the "
                         "kernel of the layer that maps these pre-logits to the logits, shaped [d, k].")
    if bias.shape != (kernel.shape[1],) or not np.isfinite(bias).all():
        raise ValueError(f"head_bias must be a finite vector of shape ({kernel.shape[1]},) to match head_kernel "
                         f"{kernel.shape}, got shape {bias.shape}.")
    return kernel, bias


def vim_principal_dim(feature_dim: int, vim_dim: int = 0) -> int:
    """D: `vim_dim`, or with 0 the ViM paper's rule for the feature size (see the module docstring)."""
    if int(vim_dim) != vim_dim or vim_dim < 0:
        raise ValueError(f"ood.vim_dim must be an integer >= 0 (0 = the paper's rule), got {vim_dim}.")
    if vim_dim:
        dim = int(vim_dim)
    else:
        dim = 1000 if feature_dim >= 1500 else 512 if feature_dim >= 768 else feature_dim // 2
    if not 1 <= dim < feature_dim:
        raise ValueError(f"ViM's principal space must have 1 <= D < d = {feature_dim} (the pre-logit dim), got "
                         f"D = {dim}: set ood.vim_dim in [1, {feature_dim - 1}]" +
                         (" (ViM needs pre-logits of dim >= 2)." if feature_dim < 2 else "."))
    return dim


@dataclasses.dataclass(frozen=True)
class ViMParams:
    """origin: [d] u; basis: [d, r] orthonormal, the principal space (residual_basis False) or its complement
    (True), whichever is smaller; alpha: the matching constant; principal_dim: D."""

    origin: np.ndarray
    basis: np.ndarray
    residual_basis: bool
    alpha: float
    principal_dim: int


@jax.jit
def _moment_chunk(x, origin, valid):
    centred = jnp.where(valid[:, None], x - origin, 0.0)
    return jnp.dot(centred.T, centred, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("residual_basis",))
def _residual_norms_chunk(x, origin, basis, *, residual_basis):
    centred = x - origin
    projected = jnp.dot(centred, basis, precision=HIGHEST)
    projected_sq = jnp.sum(projected * projected, axis=1)
    residual_sq = projected_sq if residual_basis else jnp.sum(centred * centred, axis=1) - projected_sq
    return jnp.sqrt(jnp.maximum(residual_sq, 0.0))


def vim_residual_norms(params: ViMParams, features, *, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """[N] ||(x - u)^{P-perp}|| in float64, chunked over rows."""
    features = as_matrix("features", features, dim=params.origin.shape[0])
    chunk_size = min(check_chunk("chunk_size", chunk_size), features.shape[0])
    norms = np.empty(features.shape[0], np.float64)
    with jax.enable_x64(True):
        origin = jnp.asarray(params.origin, jnp.float64)
        basis = jnp.asarray(params.basis, jnp.float64)
        for start, stop in chunks(features.shape[0], chunk_size):
            chunk = jnp.asarray(padded_chunk(features, start, stop, chunk_size), jnp.float64)
            norms[start:stop] = np.asarray(_residual_norms_chunk(
                chunk, origin, basis, residual_basis=params.residual_basis))[:stop - start]
    return norms


def fit_vim(train_features, train_logits, head_kernel, head_bias, *, vim_dim: int = 0,
            chunk_size: int = _CHUNK_ROWS) -> ViMParams:
    """Origin, residual subspace and alpha from the training pre-logits [N, d] and logits [N, k]."""
    train_features = as_matrix("train pre_logits", train_features)
    num_examples, dim = train_features.shape
    kernel = as_matrix("head_kernel", head_kernel, dim=None).astype(np.float64)
    bias = np.asarray(head_bias, np.float64)
    if kernel.shape[0] != dim or bias.shape != (kernel.shape[1],):
        raise ValueError(f"the head (kernel {kernel.shape}, bias {bias.shape}) does not match pre-logits of dim {dim}; "
                         "pass head_kernel [d, k] and head_bias [k] with logits = pre_logits @ kernel + bias.")
    train_logits = as_matrix("train logits", train_logits, dim=kernel.shape[1])
    if train_logits.shape[0] != num_examples:
        raise ValueError(f"train logits have {train_logits.shape[0]} rows but the pre-logits {num_examples}; "
                         "pass the logits of the same examples.")
    principal_dim = vim_principal_dim(dim, vim_dim)
    chunk_size = min(check_chunk("chunk_size", chunk_size), num_examples)

    origin = -np.linalg.pinv(kernel.T) @ bias  # [d]: solves W^T u = -b in the least-squares, min-norm sense
    with jax.enable_x64(True):
        device_origin = jnp.asarray(origin, jnp.float64)
        moment = 0.0
        for start, stop in chunks(num_examples, chunk_size):
            valid = np.arange(chunk_size) < stop - start
            chunk = jnp.asarray(padded_chunk(train_features, start, stop, chunk_size), jnp.float64)
            moment = moment + _moment_chunk(chunk, device_origin, valid)
        _, eigvecs = jnp.linalg.eigh(moment / num_examples)  # ascending eigenvalues
        mean_norm_sq = float(jnp.trace(moment)) / num_examples  # mean ||x - u||^2
        residual_dim = dim - principal_dim
        residual_basis = residual_dim <= principal_dim
        eigvecs = eigvecs[:, :residual_dim] if residual_basis else eigvecs[:, residual_dim:]
        basis = np.asarray(eigvecs, np.float64)

    params = ViMParams(origin=origin, basis=basis, residual_basis=residual_basis, alpha=np.nan,
                       principal_dim=principal_dim)
    residuals = vim_residual_norms(params, train_features, chunk_size=chunk_size)
    mean_residual = float(residuals.mean())
    mean_max_logit = float(np.max(train_logits.astype(np.float64), axis=1).mean())
    if not mean_residual > 1e-6 * np.sqrt(mean_norm_sq):  # float64 round-off of r^2 ~ eps ||x - u||^2
        raise ValueError(f"the training pre-logits lie in ViM's D = {principal_dim} dim principal space (mean residual "
                         f"norm {mean_residual:.3g}), so alpha is undefined; lower ood.vim_dim below the rank of the "
                         "training features (or use more training examples).")
    if not mean_max_logit > 0:
        raise ValueError(f"the mean training max-logit is {mean_max_logit:.3g} <= 0, so ViM's alpha (mean max-logit / "
                         "mean residual) would be <= 0 and reward large residuals; ViM assumes positive max-logits: "
                         "check head_kernel/head_bias and the logits, or use another scorer.")
    return dataclasses.replace(params, alpha=mean_max_logit / mean_residual)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    maximum = logits.max(axis=1)
    return maximum + np.log(np.sum(np.exp(logits - maximum[:, None]), axis=1))


def vim_score(params: ViMParams, features, logits, *, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """[N] float64 logsumexp_j l_j - alpha * ||(x - u)^{P-perp}|| (higher = more in-distribution)."""
    features = as_matrix("pre_logits", features, dim=params.origin.shape[0])
    logits = as_matrix("logits", logits)
    if logits.shape[0] != features.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but the pre-logits {features.shape[0]}; "
                         "pass both for the same examples.")
    residuals = vim_residual_norms(params, features, chunk_size=chunk_size)
    return _logsumexp(logits.astype(np.float64)) - params.alpha * residuals


@register
class ViM(Scorer):
    name = "vim"
    rank = 31
    needs = ("pre_logits", "logits")
    description = ("Wang et al. 2022 (ViM): logsumexp(logits) - alpha * ||residual of (x - u) outside the top-D "
                   "principal space|| (D = ood.vim_dim, 0 = paper's rule)")

    def fit(self, train, ctx):
        features = as_matrix("train pre_logits", train["pre_logits"])
        kernel, bias = head_parameters(ctx, features.shape[1], "vim")
        return fit_vim(features, train["logits"], kernel, bias, vim_dim=ctx.config.ood.vim_dim)

    def score(self, fitted, features, ctx):
        logits = features["logits"]
        return vim_score(fitted, features["pre_logits"], logits), np.argmax(logits, axis=1)

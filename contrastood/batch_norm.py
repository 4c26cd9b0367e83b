"""BatchNorm (and ReLU) with hand-written gradients: flax's `nn.BatchNorm` variables and results, less memory traffic.

Why: differentiating flax's BatchNorm makes XLA keep float32 intermediates of every activation
((x - mean), its scaled copy, the ReLU mask's select) and run several full passes over each of them.
In a bfloat16 ResNet-18 step on the 2-core AMD EPYC of results/cpu_speed, those fusions took about
330 of the 420 ms a step spent outside the convolutions. Here the training forward keeps only its
input (in the compute dtype) and two per-channel vectors; the statistics are one pass over the input
and the backward one reduction pass (sum dy, sum dy * x) and one elementwise pass. The sums are
contrastood.channel_sums' (a one-pass kernel on CPU backends, jnp elsewhere); the rest XLA fuses.

`BatchNorm` is a drop-in for `nn.BatchNorm(use_running_average=..., momentum=..., epsilon=...,
dtype=...)`: the same parameters ('scale', 'bias'), the same batch statistics ('mean', 'var', updated
as flax does: the biased batch variance E[x^2] - E[x]^2 in float32, clipped at 0), and the same
normalisation, so checkpoints and results carry over. Under the global-view jit the batch statistics
are global, as flax's are. It also takes the block's residual and ReLU (`BatchNorm()(y, residual, relu=True)` is
`relu(residual + BatchNorm()(y))`): in training the normalising pass adds and rectifies, and the backward's two
passes mask by the output (contrastood.norm_act, a vectorised kernel per pass on CPU backends), so no separate
residual or ReLU pass runs in either direction.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastood import channel_sums, norm_act

IMPLS = ("fused", "flax")


def _stats(x):
    """flax's statistics over all axes but the last: the mean and the fast variance E[x^2] - E[x]^2, in
    float32, clipped at 0 (channel_sums: one pass over x on CPU backends)."""
    count = x.size // x.shape[-1]
    total, total_square = channel_sums.moments(x)
    mean = total / count
    return mean, jnp.maximum(total_square / count - jnp.square(mean), 0.0)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    """flax's normalisation, in float32: (x - mean) * (rsqrt(var + eps) * scale) + bias."""
    y = x.astype(jnp.float32) - mean
    y = y * (jax.lax.rsqrt(var + epsilon) * scale)
    return (y + bias).astype(dtype)


def train_batch_norm(x, scale, bias, epsilon: float, dtype, residual=None, relu: bool = False):
    """(act(normalised x with the batch's statistics [+ residual]), batch mean, batch variance), reducing all
    but the last axis; act = ReLU if `relu`. The residual add and the ReLU are the model's `relu(residual + bn(x))`,
    done in the normalising pass (contrastood.norm_act)."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != jnp.dtype(dtype)):
        raise ValueError(f"BatchNorm residual must be {x.shape} {jnp.dtype(dtype)}, got {residual.shape} "
                         f"{residual.dtype}")
    return _train_norm_act(x, scale, bias, residual, epsilon, dtype, relu, residual is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _train_norm_act(x, scale, bias, residual, epsilon, dtype, relu, has_residual):
    out, _ = _train_forward(x, scale, bias, residual, epsilon, dtype, relu, has_residual)
    return out


def _train_forward(x, scale, bias, residual, epsilon, dtype, relu, has_residual):
    mean, var = _stats(x)
    inv = jax.lax.rsqrt(var + epsilon)
    y = norm_act.forward(x, mean, inv * scale, bias, residual, relu, dtype)
    return (y, mean, var), (x, y if relu else None, mean, inv, scale)


def _train_backward(epsilon, dtype, relu, has_residual, residuals, cotangents):
    """dz = where(y > 0, g, 0) (the ReLU's mask by its output y, when there is one), then
    dx = scale * inv * (dz - mean(dz) - x_hat * mean(dz * x_hat)), with x_hat = (x - mean) * inv, and dz is the
    residual's gradient.

    One pass sums dz and dz * x (channel_sums.masked_dots; sum(dz * x_hat) = inv * (sum(dz * x) - mean * sum(dz)),
    the same cancellation as the fast variance), and one elementwise pass makes dx (and dz for the residual:
    norm_act.backward). The barriers keep XLA from fusing g's producers into both passes where jnp runs them."""
    barrier = jax.lax.optimization_barrier
    x, y, mean, inv, scale = residuals
    x, g, y = barrier((x, cotangents[0], y))  # the statistics feed only the running averages: zero cotangents
    count = x.size // x.shape[-1]
    dbias, dy_x = channel_sums.masked_dots(x, g, y) if relu else channel_sums.dots(x, g)
    dscale = inv * (dy_x - mean * dbias)
    x, g, y, dbias, dscale = barrier((x, g, y, dbias, dscale))
    dx, dz = norm_act.backward(x, g, y, mean, inv, scale * inv, dbias / count, dscale / count, relu, has_residual)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype), dz


_train_norm_act.defvjp(_train_forward, _train_backward)


@jax.custom_vjp
def relu(x):
    """max(x, 0), whose gradient masks by the output (y > 0 exactly where x > 0), so the backward keeps the
    output, which the next convolution keeps anyway. jax.nn.relu's keeps its input, and then XLA writes both
    the input and the output of every BatchNorm + ReLU and residual add + ReLU (one more pass each)."""
    return jnp.maximum(x, 0)


def _relu_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_backward(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_forward, _relu_backward)
_relu = relu  # for BatchNorm, whose argument `relu` hides the name


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis, with `train_batch_norm`'s gradient (see the module docstring)."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, residual=None, relu: bool = False):
        """act(BN(x) [+ residual]), act = ReLU if `relu`: in training one pass (train_batch_norm)."""
        features = x.shape[-1]
        dtype = self.dtype or x.dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        if self.use_running_average:
            y = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
            y = y if residual is None else residual + y
            return _relu(y) if relu else y
        y, mean, var = train_batch_norm(x, scale, bias, self.epsilon, dtype, residual, relu)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
        return y

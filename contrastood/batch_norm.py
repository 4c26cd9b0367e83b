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
are global, as flax's are.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastood import channel_sums

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def train_batch_norm(x, scale, bias, epsilon: float, dtype):
    """(normalised x with the batch's statistics, batch mean, batch variance), reducing all but the last axis."""
    out, _ = _train_forward(x, scale, bias, epsilon, dtype)
    return out


def _train_forward(x, scale, bias, epsilon, dtype):
    mean, var = _stats(x)
    y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _train_backward(epsilon, dtype, residuals, cotangents):
    """dx = scale * inv * (dy - mean(dy) - x_hat * mean(dy * x_hat)), with x_hat = (x - mean) * inv.

    One pass sums dy and dy * x (channel_sums.dots; sum(dy * x_hat) = inv * (sum(dy * x) - mean * sum(dy)),
    the same cancellation as the fast variance), and one elementwise pass makes dx. The barriers keep XLA
    from fusing dy's producers (the ReLU mask) into both passes."""
    barrier = jax.lax.optimization_barrier
    x, mean, inv, scale = residuals
    x, dy = barrier((x, cotangents[0]))  # the statistics feed only the running averages: zero cotangents
    count = x.size // x.shape[-1]
    dbias, dy_x = channel_sums.dots(x, dy)
    dscale = inv * (dy_x - mean * dbias)
    x, dy, dbias, dscale = barrier((x, dy, dbias, dscale))
    x_hat = (x.astype(jnp.float32) - mean) * inv
    dx = (scale * inv) * (dy.astype(jnp.float32) - (dbias / count + x_hat * (dscale / count)))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


train_batch_norm.defvjp(_train_forward, _train_backward)


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


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis, with `train_batch_norm`'s gradient (see the module docstring)."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        dtype = self.dtype or x.dtype
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        if self.use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
        y, mean, var = train_batch_norm(x, scale, bias, self.epsilon, dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
        return y

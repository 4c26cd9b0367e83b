"""BatchNorm's elementwise passes, one vectorised sweep each on CPU backends (contrastood/kernels/norm_act.cc).

Why: on the 2-core Xeon of results/cpu_speed, XLA:CPU's loop fusions for BatchNorm's normalise + residual add +
ReLU and for its input gradient ran at half the memory bandwidth or less (bfloat16 converts, and 16-channel
minor dimensions). In ResNet-18's bfloat16 train step they were the largest cost outside the convolutions.

- `forward(x, mean, a, bias, residual, relu, dtype)`: act(((x - mean) * a + bias) in float32, rounded to dtype,
  [+ residual, rounded again]), act = ReLU or identity.
- `backward(x, g, y, mean, inv, k, p, q, relu, want_dz)`: dz = ReLU ? where(y > 0, g, 0) : g, and
  dx = k * (dz - (p + ((x - mean) * inv) * q)); (dx, dz) when the residual needs dz.

The kernel does the jnp expressions' float32 operations in the same order, without contraction, so the two agree
bit for bit; jnp runs elsewhere (GPU, TPU, or where the kernel does not build), where XLA fuses them well.
Under the global-view jit each device runs its batch shard (`custom_partitioning`): no activation is gathered.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import native, onednn_conv

SOURCE = native.KERNELS / "norm_act.cc"
_TARGETS = ("ContrastoodNormActForward", "ContrastoodNormAddActForward", "ContrastoodNormActBackward",
            "ContrastoodNormAddActBackward")


@functools.cache
def load() -> str | None:
    """Builds and registers the kernel (once per process); None on success, else why not."""
    try:
        kernel = ctypes.CDLL(native.build(SOURCE, ["-O3", "-fopenmp", "-ffp-contract=off"]))
        for symbol in _TARGETS:
            jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(kernel, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("BatchNorm elementwise passes: jnp's, because %s", e)
        return str(e)
    return None


def _use_kernel(*xs) -> bool:
    return (jax.default_backend() == "cpu" and xs[0].ndim >= 2 and xs[0].dtype in (jnp.float32, jnp.bfloat16)
            and all(x.dtype == xs[0].dtype and x.shape == xs[0].shape for x in xs) and load() is None)


@functools.cache
def _op(target: str, ndim: int, activations: tuple[bool, ...], outputs: int, relu: bool):
    """The FFI call `target` as a batch-parallel op: `activations` marks the operands shaped like x (batch-sharded;
    the others are per-channel vectors, replicated); its `outputs` results are shaped like x."""
    dims = " ".join(["n"] + [f"d{i}" for i in range(1, ndim - 1)] + ["c"])
    rule = ", ".join(dims if a else "c" for a in activations) + " -> " + ", ".join([dims] * outputs)

    def call(threads, *args):
        x = args[0]
        out = (jax.ShapeDtypeStruct(x.shape, x.dtype),) * outputs
        results = jax.ffi.ffi_call(target, out)(*args, relu=relu, threads=np.int64(threads))
        return results if outputs > 1 else results[0]

    def shardings(mesh, arg_shapes):
        batch = onednn_conv.batch_spec(arg_shapes[0].sharding)
        act, vec = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())
        return act, tuple(act if a else vec for a in activations)

    def infer(mesh, arg_shapes, result_shape):
        act = shardings(mesh, arg_shapes)[0]
        return (act,) * outputs if outputs > 1 else act

    def partition(mesh, arg_shapes, result_shape):
        threads = onednn_conv.threads_for_mesh(mesh)
        return (mesh, functools.partial(call, threads), infer(mesh, arg_shapes, result_shape),
                shardings(mesh, arg_shapes)[1])

    @custom_partitioning
    def op(*args):
        return call(0, *args)

    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=tuple(dims.split()[1:]))
    return op


def forward(x, mean, a, bias, residual, relu: bool, dtype):
    """act(((x - mean) * a + bias).astype(dtype) [+ residual]); mean, a, bias: float32 per channel."""
    vectors = [v.astype(jnp.float32) for v in (mean, a, bias)]
    if x.dtype == dtype and _use_kernel(x, *(() if residual is None else (residual,))):
        if residual is None:
            return _op("ContrastoodNormActForward", x.ndim, (True, False, False, False), 1, relu)(x, *vectors)
        return _op("ContrastoodNormAddActForward", x.ndim, (True, False, False, False, True), 1, relu)(
            x, *vectors, residual)
    mean, a, bias = vectors
    y = ((x.astype(jnp.float32) - mean) * a + bias).astype(dtype)
    if residual is not None:
        y = residual + y
    return jnp.maximum(y, 0) if relu else y


def backward(x, g, y, mean, inv, k, p, q, relu: bool, want_dz: bool):
    """(dx, dz or None): dz = where(y > 0, g, 0) if relu else g; dx = k * (dz - (p + ((x - mean) * inv) * q))."""
    vectors = [v.astype(jnp.float32) for v in (mean, inv, k, p, q)]
    y = y if relu else x  # unread without the ReLU
    if _use_kernel(x, g, y):
        target = "ContrastoodNormAddActBackward" if want_dz else "ContrastoodNormActBackward"
        out = _op(target, x.ndim, (True, True, True) + (False,) * 5, 2 if want_dz else 1, relu)(x, g, y, *vectors)
        return tuple(out) if want_dz else (out, None)
    mean, inv, k, p, q = vectors
    dz = jnp.where(y > 0, g, jnp.zeros_like(g)) if relu else g
    x_hat = (x.astype(jnp.float32) - mean) * inv
    dx = k * (dz.astype(jnp.float32) - (p + x_hat * q))
    return dx.astype(x.dtype), (dz if want_dz else None)

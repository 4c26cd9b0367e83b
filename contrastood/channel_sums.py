"""BatchNorm's per-channel sums in one pass (contrastood/kernels/channel_sums.cc) on CPU backends.

Why: XLA:CPU writes a float32 copy of a bfloat16 activation before each of its reductions (YNNPACK's
reductions take no convert), so BatchNorm's statistics cost a write and two reads of twice the
activation's bytes. The kernel reads it once. Under the global-view jit each device sums its batch
shard and the sums are added over the batch axes (`custom_partitioning`), so no activation is
gathered. Elsewhere (GPU, TPU, or a machine where the kernel does not build) `moments` and `dots`
are the same sums in jnp, which XLA fuses well there.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import native, onednn_conv

SOURCE = native.KERNELS / "channel_sums.cc"
_TARGETS = {"moments": "ContrastoodChannelMoments", "dots": "ContrastoodChannelDots",
            "masked_dots": "ContrastoodChannelMaskedDots"}


@functools.cache
def load() -> str | None:
    """Builds and registers the kernel (once per process); None on success, else why not."""
    try:
        kernel = ctypes.CDLL(native.build(SOURCE, ["-O3", "-fopenmp"]))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"contrastood_channel_{name}", jax.ffi.pycapsule(getattr(kernel, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.warning("BatchNorm sums: jnp's, because %s", e)
        return str(e)
    return None


def _use_kernel(x) -> bool:
    return jax.default_backend() == "cpu" and x.dtype in (jnp.float32, jnp.bfloat16) and load() is None


def _call(name: str, threads: int, *args):
    c = args[0].shape[-1]
    out = (jax.ShapeDtypeStruct((c,), jnp.float32),) * 2
    return jax.ffi.ffi_call(f"contrastood_channel_{name}", out)(*args, threads=np.int64(threads))


def _partitioned(name: str, operands: int):
    """The kernel as a batch-parallel op: each device sums its shard; the sums are added over the batch axes."""

    def infer(mesh, arg_shapes, result_shape):
        return (NamedSharding(mesh, P()),) * 2

    def partition(mesh, arg_shapes, result_shape):
        batch = onednn_conv.batch_spec(arg_shapes[0].sharding)
        threads = onednn_conv.threads_for_mesh(mesh)

        def lower(*args):
            sums = _call(name, threads, *args)
            return tuple(lax.psum(s, batch) for s in sums) if batch is not None else sums

        spec = NamedSharding(mesh, P(batch))
        return mesh, lower, infer(mesh, arg_shapes, result_shape), (spec,) * operands

    @functools.cache
    def for_rank(ndim: int):
        dims = ["n"] + [f"d{i}" for i in range(1, ndim - 1)] + ["c"]
        rule = ", ".join([" ".join(dims)] * operands) + " -> c, c"

        @custom_partitioning
        def op(*args):
            return _call(name, 0, *args)

        op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                         reduction_factors=("n",), need_replication_factors=tuple(dims[1:]))
        return op

    return for_rank


_moments = _partitioned("moments", 1)
_dots = _partitioned("dots", 2)
_masked_dots = _partitioned("masked_dots", 3)


def moments(x):
    """(sum x, sum x^2) in float32 over all axes but the last."""
    if _use_kernel(x) and x.ndim >= 2:
        return _moments(x.ndim)(x)
    axes = tuple(range(x.ndim - 1))  # the barrier keeps XLA:CPU from one slow multi-output loop (batch_norm)
    return (jnp.sum(x.astype(jnp.float32), axes),
            jnp.sum(jnp.square(lax.optimization_barrier(x).astype(jnp.float32)), axes))


def dots(x, dy):
    """(sum dy, sum dy * x) in float32 over all axes but the last."""
    if _use_kernel(x) and x.ndim >= 2 and dy.dtype == x.dtype:
        return _dots(x.ndim)(x, dy)
    axes = tuple(range(x.ndim - 1))
    x_, dy_ = lax.optimization_barrier((x, dy))
    return jnp.sum(dy.astype(jnp.float32), axes), jnp.sum(dy_.astype(jnp.float32) * x_.astype(jnp.float32), axes)


def masked_dots(x, g, y):
    """dots(x, where(y > 0, g, 0)) without writing the masked cotangent: y is a ReLU's output, g its cotangent."""
    if _use_kernel(x) and x.ndim >= 2 and g.dtype == x.dtype and y.dtype == x.dtype:
        return _masked_dots(x.ndim)(x, g, y)
    return dots(x, jnp.where(y > 0, g, jnp.zeros_like(g)))

"""oneDNN convolutions for XLA:CPU: a drop-in `conv_general_dilated` for flax's `nn.Conv`.

Why: XLA:CPU runs convolutions through Eigen and transposes the operands of every weight gradient.
On the 2-core AMD EPYC of results/cpu_speed that made the tiny ResNet's convolutions (forward and
both gradients) 2.3x slower than oneDNN's on the same NHWC buffers, and the whole step 0.45x
PyTorch's best CPU mode. Here the three convolutions of a layer (forward, backward-data,
backward-weights) are XLA FFI calls into oneDNN (contrastood/kernels/onednn_conv.cc), tied together
by a custom VJP.

- They are partitioned like a batch-parallel op (`custom_partitioning`): under the global-view jit
  each device convolves its batch shard, and the weight gradient is summed over the batch axes, so
  no activation is ever gathered.
- The kernel is compiled once per source, jaxlib and libdnnl (`contrastood.native`: a few seconds,
  with the system's C++ compiler, into the cache directory that `perf` uses, under a file lock).
- It is loaded from the `onednn-cpu-gomp` wheel (a setup.py dependency on Linux x86-64), or from
  `CONTRASTOOD_ONEDNN_LIBRARY`.

Winograd F(4x4, 3x3) (`winograd_conv3x3`, the same kernel library): the 3x3 stride-1 float32 layers
of 64 channels or more, which carry most of a ResNet's FLOPs, with 4x fewer multiplications (input
and output transforms in C++, the 36 products over channels as one batched oneDNN matmul). oneDNN
3.x has only direct x64 convolutions, which ran level with PyTorch's; this ran ResNet-18's float32
step 1.66x faster than them (results/README.md), within about 1e-5 of the output's scale. bfloat16
layers of 64 channels or more take Winograd F(2x2, 3x3) with bfloat16 products instead
(`winograd_bf16_conv3x3`, on CPUs with bfloat16 dot-product hardware): 2.25x fewer multiplications at
about twice the direct bfloat16 kernel's rounding error (F(4x4)'s transforms amplify bfloat16 rounding
25-fold).

Strided layers' weight gradients in bfloat16 (and float32 from 128 input channels) are one oneDNN matmul over
im2col patches built per thread in its cache (`im2col_weight_gradient`): oneDNN 3.2's backward-weights kernel
ran those at about half its forward's rate.

Whether Winograd pays depends on the CPU too, so a long training run (perf.TUNE_MIN_STEPS steps or more)
first times it against the direct kernels for each layer shape it supports, once per CPU model and jax
version, and each layer takes the faster (`choose_layers`, cached beside perf's XLA:CPU options).

`model.conv` chooses: "auto" takes Winograd where it applies (and, where measured, pays) and oneDNN's direct
kernels for the other layers on a CPU backend where the kernel builds, and XLA everywhere else (GPU, TPU, or a machine
without a compiler), and logs which one and why. "winograd" and "onednn" (direct kernels only) fail
fast when they cannot load, naming the fix. "xla" always uses `lax.conv_general_dilated`. Anything
the kernels do not cover (dilation, groups, other layouts or dtypes) also falls back to XLA, per
call, so the choice never changes a model's results beyond float rounding.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import re
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastood import native, perf

SOURCE = native.KERNELS / "onednn_conv.cc"
IMPLS = ("auto", "xla", "onednn", "winograd")
LIBRARY_ENV = "CONTRASTOOD_ONEDNN_LIBRARY"  # path of libdnnl.so.3, when not the onednn-cpu-gomp wheel's
CACHE_ENV = perf.CACHE_ENV  # where compiled kernels are kept (perf.cache_root)
_TARGETS = ("Forward", "BackwardData", "BackwardWeights", "WinoForward", "WinoBackwardWeights", "Wino2Forward",
            "Wino2BackwardWeights", "Im2colBackwardWeights", "Col2imBackwardData")
_FIX = ("install the onednn-cpu-gomp wheel (pip install onednn-cpu-gomp) and a C++ compiler (g++), "
        "or set --config.model.conv=xla")


def find_library() -> str | None:
    """libdnnl.so.3: $CONTRASTOOD_ONEDNN_LIBRARY, else the onednn-cpu-gomp wheel's (under sys.prefix/lib)."""
    if os.environ.get(LIBRARY_ENV):
        return os.environ[LIBRARY_ENV]
    roots = {sys.prefix, sys.base_prefix, sysconfig.get_config_var("userbase") or ""}
    for root in sorted(r for r in roots if r):
        hits = sorted(glob.glob(os.path.join(root, "lib", "libdnnl.so.3*")))
        if hits:
            return hits[0]
    found = ctypes.util.find_library("dnnl")
    return found


def _build(library: str) -> str:
    """Compiles the kernel against `library` (once; later calls find it in the cache) and returns its path."""
    library = os.path.realpath(library)
    libdir, name = os.path.split(library)
    return native.build(SOURCE, ["-O3", "-fopenmp", f"-L{libdir}", f"-l:{name}", f"-Wl,-rpath,{libdir}"],
                        [library.encode(), str(os.stat(library).st_size).encode()])


@functools.cache
def _kernel() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded kernel with its FFI targets registered, None) or (None, why oneDNN cannot be used)."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return None, f"oneDNN kernels are built for Linux x86-64 only (this is {sys.platform}/{os.uname().machine})"
    library = find_library()
    if not library:
        return None, f"libdnnl.so.3 not found; {_FIX}"
    if os.path.isabs(library) and not os.path.exists(library):
        return None, f"{library} does not exist ({LIBRARY_ENV}?); {_FIX}"
    try:
        kernel = ctypes.CDLL(_build(library))
        for target in _TARGETS:
            jax.ffi.register_ffi_target(f"contrastood_conv_{target}",
                                        jax.ffi.pycapsule(getattr(kernel, f"ContrastoodConv{target}")),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        return None, f"{e}; {_FIX}"
    return kernel, None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_call(devices: int, cores: int, environ=os.environ) -> int:
    """OpenMP threads for each of `devices` concurrent oneDNN calls; 0: OpenMP's default (all cores).

    XLA runs every CPU device's share of a sharded computation on that device's own thread at the
    same time, and each oneDNN call opens its own OpenMP team. With 8 forced devices on 2 cores,
    teams of 2 made the tiny step take 217.5-247.1 ms against 169.4-180.3 ms with one thread per
    call (results/README.md), so the devices of a sharded call split the cores. Unsharded calls keep
    OpenMP's default, and a user's OMP_NUM_THREADS is left alone."""
    if environ.get("OMP_NUM_THREADS") or devices <= 1:
        return 0
    return max(1, cores // devices)


def threads_for_mesh(mesh) -> int:
    """threads_per_call for a call partitioned over `mesh`: its devices in this process run at once."""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return threads_per_call(local, _cores())


def load() -> str | None:
    """Builds and registers the FFI targets (once per process); None on success, else why not."""
    return _kernel()[1]


def version() -> str:
    """oneDNN's version once the kernel loaded ('' if it did not)."""
    kernel = _kernel()[0]
    if kernel is None:
        return ""
    v = kernel.contrastood_onednn_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


@functools.cache
def resolve(impl: str, backend: str) -> str:
    """'xla', 'onednn' or 'winograd' for model.conv=`impl` on `backend`; logs the choice once per process."""
    if impl not in IMPLS:
        raise ValueError(f"unknown model.conv {impl!r}; choose one of {IMPLS}")
    if impl == "xla":
        return "xla"
    if backend != "cpu":
        if impl in ("onednn", "winograd"):
            raise ValueError(f"model.conv={impl} runs on CPU backends only (this one is {backend}); "
                             "set --config.model.conv=auto or xla")
        return "xla"
    problem = load()
    if problem is None:
        chosen = "onednn" if impl == "onednn" else "winograd"
        logging.info("convolutions: oneDNN %s, %s (model.conv=%s)", version(),
                     "direct" if chosen == "onednn" else "Winograd where it applies (F(4x4,3x3) in float32, F(2x2,3x3) "
                     "in bfloat16 on bfloat16 hardware), else direct", impl)
        return chosen
    if impl in ("onednn", "winograd"):
        raise RuntimeError(f"model.conv={impl}, but the oneDNN kernel is unavailable: {problem}")
    logging.warning("convolutions: XLA's, because %s", problem)
    return "xla"


# --- The three convolutions, each partitioned over the batch (leading) dimension. ---

def batch_spec(sharding):
    """The mesh axes a sharding splits the leading (batch) dimension over; None if it is not split."""
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec is not None and len(spec) else None


def _shards(mesh, batch) -> int:
    if batch is None:
        return 1
    axes = batch if isinstance(batch, tuple) else (batch,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def _call(target: str, shape, dtype, a, b, strides, padding, threads: int = 0):
    return jax.ffi.ffi_call(f"contrastood_conv_{target}", jax.ShapeDtypeStruct(tuple(shape), dtype))(
        a, b, strides=np.asarray(strides, np.int64), padding=np.asarray(padding, np.int64), threads=np.int64(threads))


def _factors(rule: str, skip: str) -> tuple[str, ...]:
    seen: list[str] = []
    for factor in rule.replace(",", " ").replace("->", " ").split():
        if factor not in seen and factor != skip:
            seen.append(factor)
    return tuple(seen)


def _partitioned(target: str, rule: str, sums_batch: bool, out_dtype=None):
    """`target` as a custom-partitioned op: batch-sharded operands in, batch-sharded (or summed) out, of the first
    operand's dtype unless `out_dtype`."""

    @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
    def op(a, b, shape, strides, padding):
        return _call(target, shape, out_dtype or a.dtype, a, b, strides, padding)

    def infer(shape, strides, padding, mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P() if sums_batch else P(batch_spec(arg_shapes[0].sharding)))

    def partition(shape, strides, padding, mesh, arg_shapes, result_shape):
        batch = batch_spec(arg_shapes[0].sharding)
        local = tuple(shape) if sums_batch else (shape[0] // _shards(mesh, batch),) + tuple(shape[1:])
        threads = threads_for_mesh(mesh)

        def lower(a, b):
            out = _call(target, local, out_dtype or a.dtype, a, b, strides, padding, threads)
            return lax.psum(out, batch) if sums_batch and batch is not None else out

        arg_shardings = (NamedSharding(mesh, P(batch)), NamedSharding(mesh, P(batch) if sums_batch else P()))
        return mesh, lower, infer(shape, strides, padding, mesh, arg_shapes, result_shape), arg_shardings

    kwargs = {"reduction_factors": ("n",)} if sums_batch else {}
    op.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=_factors(rule, "n"), **kwargs)
    return op


_forward = _partitioned("Forward", "n h w c, i j c o -> n p q o", sums_batch=False)
_backward_data = _partitioned("BackwardData", "n p q o, i j c o -> n h w c", sums_batch=False)
_backward_weights = _partitioned("BackwardWeights", "n h w c, n p q o -> i j c o", sums_batch=True)
_im2col_backward_weights = _partitioned("Im2colBackwardWeights", "n h w c, n p q o -> i j c o", sums_batch=True)
_col2im_backward_data = _partitioned("Col2imBackwardData", "n p q o, i j c o -> n h w c", sums_batch=False)
_wino_forward = _partitioned("WinoForward", "n h w c, t c o -> n h w o", sums_batch=False)
_wino_backward_weights = _partitioned("WinoBackwardWeights", "n h w c, n h w o -> t c o", sums_batch=True)
_wino2_forward = _partitioned("Wino2Forward", "n h w c, t c o -> n h w o", sums_batch=False)
_wino2_backward_weights = _partitioned("Wino2BackwardWeights", "n h w c, n h w o -> t c o", sums_batch=True,
                                       out_dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, w, strides: tuple[int, int], padding: tuple[int, int, int, int]):
    """2-D convolution of NHWC `x` with HWIO `w`; padding = (top, bottom, left, right)."""
    n, h, width, _ = x.shape
    kh, kw, _, o = w.shape
    ho = (h + padding[0] + padding[1] - kh) // strides[0] + 1
    wo = (width + padding[2] + padding[3] - kw) // strides[1] + 1
    return _forward(x, w, (n, ho, wo, o), strides, padding)


def _conv_fwd(x, w, strides, padding):
    return conv_nhwc(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    col2im, im2col = strided_gradients_measured(x, w, strides, padding)
    data = _col2im_backward_data if col2im else _backward_data
    weights = _im2col_backward_weights if im2col else _backward_weights
    return (data(dy, w, x.shape, strides, padding), weights(x, dy, w.shape, strides, padding))


def im2col_weight_gradient(dtype, w_shape, strides) -> bool:
    """Whether a layer's weight gradient is one matmul over im2col patches (kernels/onednn_conv.cc says why) rather
    than oneDNN's backward-weights kernel: strided layers with more than one tap, in bfloat16, or in float32 from 128
    input channels. On the 2-core AMD EPYC (Zen 4) of results/README.md, batch 256, the fastest of 7 (ms, direct
    against im2col): bfloat16 3x3 stride 2, 16 -> 32 channels at 32x32 4.71 against 4.31, 64 -> 128 31.0 against
    28.3, 256 -> 512 at 8x8 54.5 against 30.0; float32 16 -> 32 5.12 against 7.19, 64 -> 128 59.2 against 56.8,
    256 -> 512 80.4 against 51.9. Stride 1 and 1x1 layers lost (bfloat16 16 -> 16 at 32x32 6.9 against 17.5)."""
    return (tuple(strides) != (1, 1) and w_shape[0] * w_shape[1] > 1 and w_shape[3] % 16 == 0
            and (dtype == jnp.bfloat16 or (dtype == jnp.float32 and w_shape[2] >= 128)))


def col2im_supports(w_shape, strides) -> bool:
    """Whether a layer's data gradient can be one matmul and a col2im scatter (kernels/onednn_conv.cc says why):
    strided layers with input channels % 16 == 0. Only where choose_layers measured it faster on this CPU
    (strided_gradients_measured): on the Intel Xeon with AMX of results/README.md, bfloat16, batch 256, the fastest
    of 9 (ms, oneDNN against col2im), 3x3 stride 2: 64 -> 128 channels at 32x32 24.7 against 22.5, 128 -> 256
    30.7 against 9.7, 256 -> 512 55.9 against 7.3; 1x1 stride 2: 64 -> 128 10.4 against 11.3, 256 -> 512 8.0
    against 1.3; but 16 -> 32 at 32x32 1.2 against 2.9, and float32 gained only from 256 channels."""
    return tuple(strides) != (1, 1) and w_shape[2] % 16 == 0


conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


@functools.lru_cache(maxsize=None)
def measured_flops(dtype: str = "bfloat16", repeats: int = 5) -> float:
    """Best FLOP/s of oneDNN's 1x1 convolution, a [16384, 512] x [512, 512] product, on all cores (nan without the
    kernel): the rate this CPU's bf16 dot-product units reach (AMX or AVX512_BF16), which XLA's own bf16 matmul
    does not use. On a 2-core Xeon with AMX: 1.55-2.26 TFLOP/s in bfloat16 (two runs) against 0.30-0.33 for XLA's
    float32 matmul."""
    if load() is not None:
        return float("nan")
    x, w = jnp.ones((64, 16, 16, 512), dtype), jnp.ones((1, 1, 512, 512), dtype)
    conv = jax.jit(lambda x, w: conv_nhwc(x, w, (1, 1), (0, 0, 0, 0)))
    jax.block_until_ready(conv(x, w))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(conv(x, w))
        best = min(best, time.perf_counter() - started)
    return 2.0 * 64 * 16 * 16 * 512 * 512 / best


# --- Winograd F(4x4, 3x3) (Lavin & Gray 2016) for 3x3, stride-1, pad-1 float32 layers. ---
# y = A^T [(G g G^T) . (B^T d B)] A per 4x4 output tile; the kernel does B^T d B, the 36 products over
# channels and A^T m A (kernels/onednn_conv.cc); the weight transforms, [3,3,c,o] <-> [36,c,o], are here.
_WINO_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32)
_SAME_3X3 = ((1, 1), (1, 1, 1, 1))
# Narrower layers stay direct: their [tiles, c] x [c, o] products are too thin to pay for the transforms. On
# the 2-core Xeon of results/cpu_speed (batch 256, forward + both gradients, ms): 16 channels at 32x32 25.6
# direct against 53.8, 32 at 16x16 16.7 against 21.8, 64 at 8x8 22.7 against 15.8, 64 at 16x16 67 against 41.
WINOGRAD_MIN_CHANNELS = 64


def winograd_supports(x, w, strides, padding) -> bool:
    """Whether `winograd_conv3x3` computes this conv_nhwc call (else the direct oneDNN kernel does)."""
    return (x.dtype == jnp.float32 and tuple(w.shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(padding) == (1, 1, 1, 1) and x.shape[1] % 4 == 0 and x.shape[2] % 4 == 0
            and w.shape[2] % 16 == 0 and w.shape[3] % 16 == 0
            and min(w.shape[2], w.shape[3]) >= WINOGRAD_MIN_CHANNELS)


def _points(matrix: np.ndarray, t, axis: int):
    """matrix @ t along `axis`, written out as sums of scaled slices (XLA fuses them into one pass; as an
    einsum the [3,3,512,512] weight transform took 71 ms on a 2-core Xeon, a copy of it takes a few)."""
    rows = [sum(float(m) * lax.index_in_dim(t, i, axis, keepdims=False) for i, m in enumerate(row) if m)
            for row in matrix]
    return jnp.stack(rows, axis)


def _winograd(forward, backward_weights, g: np.ndarray):
    """A 3x3 stride-1 SAME convolution with a custom VJP from a Winograd kernel's two FFI calls, whose weight
    transform is `g` ([tile + 2, 3]): the weights go in as G w G^T (computed in float32, in w's dtype), the
    backward-data pass is the forward of the flipped, transposed weights, and the weight gradient is G^T du G."""
    size = g.shape[0]  # input tile size; the kernel's products are over size x size points

    def weights(w):
        u = _points(g, _points(g, w.astype(jnp.float32), 0), 1)
        return u.reshape(size * size, *w.shape[2:]).astype(w.dtype)

    @jax.custom_vjp
    def conv(x, w):
        return forward(x, weights(w), x.shape[:3] + w.shape[3:], *_SAME_3X3)

    def conv_fwd(x, w):
        return conv(x, w), (x, w)

    def conv_bwd(residuals, dy):
        x, w = residuals
        dy = dy.astype(x.dtype)
        flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)  # backward-data of a stride-1 SAME 3x3 conv is this conv
        dx = forward(dy, weights(flipped), x.shape, *_SAME_3X3)
        du = backward_weights(x, dy, (size * size,) + w.shape[2:], *_SAME_3X3).reshape(size, size, *w.shape[2:])
        return dx, _points(g.T, _points(g.T, du, 0), 1).astype(w.dtype)  # G^T du G

    conv.defvjp(conv_fwd, conv_bwd)
    return conv


_winograd_f4 = _winograd(_wino_forward, _wino_backward_weights, _WINO_G)


def winograd_conv3x3(x, w):
    """conv_nhwc(x, w, (1, 1), (1, 1, 1, 1)) by Winograd F(4x4, 3x3): float32 NHWC, height and width % 4 == 0,
    channels in and out % 16 == 0 (`winograd_supports`).

    Same values up to float32 rounding (about 1e-5 of the output's scale, tests/test_onednn_conv.py)."""
    return _winograd_f4(x, w)


# --- Winograd F(2x2, 3x3) in bfloat16 (kernels/onednn_conv.cc says why F(2x2) and not F(4x4) there). ---
_WINO2_G = np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float32)
# Narrower layers stay direct, as in float32. On the 2-core AMD EPYC (Zen 4) of results/README.md, batch 256,
# forward + both gradients, the fastest of 8-15 interleaved calls (ms): 32 channels at 16x16 9.1 direct against
# 12.6, 64 at 8x8 10.9 against 9.7, 64 at 32x32 142 against 118, 512 at 4x4 133 against 83.
WINOGRAD_BF16_MIN_CHANNELS = 64


def winograd_bf16_supports(x, w, strides, padding) -> bool:
    """Whether `winograd_bf16_conv3x3` computes this conv_nhwc call: only on CPUs with bfloat16 dot-product
    hardware (perf.cpu_has_bf16), where the products run at twice the float32 rate; elsewhere the direct kernels."""
    return (x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16 and perf.cpu_has_bf16()
            and tuple(w.shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and tuple(padding) == (1, 1, 1, 1)
            and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0 and w.shape[2] % 16 == 0 and w.shape[3] % 16 == 0
            and min(w.shape[2], w.shape[3]) >= WINOGRAD_BF16_MIN_CHANNELS)


_winograd_f2 = _winograd(_wino2_forward, _wino2_backward_weights, _WINO2_G)  # weights rounded once to bf16


def winograd_bf16_conv3x3(x, w):
    """conv_nhwc(x, w, (1, 1), (1, 1, 1, 1)) by Winograd F(2x2, 3x3) with bfloat16 products: bfloat16 NHWC,
    height and width even, channels in and out % 16 == 0 (`winograd_bf16_supports`).

    Rounding the transformed tiles to bfloat16 about doubles the direct bfloat16 kernel's error (max 4-7e-3 of
    the output's and gradients' scale against 2-3e-3, tests/test_onednn_conv.py); model.conv=onednn keeps the
    direct kernels."""
    return _winograd_f2(x, w)


# --- Per layer shape, Winograd or direct: measured on this CPU where a long run asked for it. ---
# Whether Winograd pays depends on the CPU, not only on the channel counts above: on the AMD EPYC (AVX512_BF16)
# bf16 F(2x2) beat the direct kernels on every layer of 64 channels or more, but on an Intel Xeon with AMX
# (results/README.md, 2026-12-04) oneDNN's AMX direct kernels ran 64 channels at 32x32 in 44.8 ms against 64.3
# and 128 at 16x16 in 26.1 against 42.2, while 512 at 4x4 took 132.4 against 47.7 (forward + both gradients).
LAYER_TABLE = "conv_layer_choices.json"  # under perf.cache_root()
_LAYER_MIN_GAIN = perf._MIN_GAIN  # direct must beat Winograd by 5% to replace it (below that it is noise)
_LAYER_ROUNDS = 5
_recorded: list | None = None  # (kind, x shape, w shape, dtype[, strides, padding]) a choose_layers trace met, uncached
_layer_choices: dict[str, dict] = {}  # this process's copy of each table it read, by path


def _layer_table_path() -> str:
    return os.path.join(perf.cache_root(), LAYER_TABLE)


def _layer_key(x_shape, w_shape, dtype) -> str:
    return perf._key(f"winograd_layer-{jnp.dtype(dtype).name}-x{'x'.join(map(str, x_shape))}"
                     f"-w{'x'.join(map(str, w_shape))}")


def _layers() -> dict:
    path = _layer_table_path()
    if path not in _layer_choices:
        _layer_choices[path] = perf._read_table(path)
    return _layer_choices[path]


def _strided_key(x_shape, w_shape, dtype, strides, padding) -> str:
    return perf._key(f"strided_layer-{jnp.dtype(dtype).name}-x{'x'.join(map(str, x_shape))}"
                     f"-w{'x'.join(map(str, w_shape))}-s{'x'.join(map(str, strides))}"
                     f"-p{'x'.join(map(str, padding))}")


def strided_gradients_measured(x, w, strides, padding) -> tuple[bool, bool]:
    """(col2im data gradient, im2col weight gradient) for a conv_nhwc layer: this CPU's measured choice for a
    strided layer's shapes where choose_layers cached one, else oneDNN's data gradient and `im2col_weight_gradient`'s
    fixed rule. The measurement matters because the rates differ by CPU: oneDNN 3.2's strided data gradient was
    1.1-7.7x slower than col2im's matmul on AMX for 3x3 layers from 64 channels up (col2im_supports), but ran at
    about 300 GFLOP/s against a bfloat16 peak of about 418 in a ResNet-18 trace on the AMD EPYC (results/README.md)."""
    default = (False, im2col_weight_gradient(x.dtype, w.shape, strides))
    if tuple(strides) == (1, 1) or not perf.layer_tuning_enabled():
        return default
    entry = _layers().get(_strided_key(x.shape, w.shape, x.dtype, strides, padding))
    if entry is None:
        if _recorded is not None:
            _recorded.append(("strided", tuple(x.shape), tuple(w.shape), jnp.dtype(x.dtype), tuple(strides),
                              tuple(padding)))
        return default
    return entry["data"] == "col2im", entry["weights"] == "im2col"


def winograd_measured(x, w) -> bool:
    """Whether a layer that Winograd supports runs by Winograd: this CPU's measured choice for its shapes where
    choose_layers cached one, else yes. CONTRASTOOD_CONV_LAYER_TUNING=0 (or CONTRASTOOD_XLA_CPU_TUNING=0) ignores
    the measurements."""
    if not perf.layer_tuning_enabled():
        return True
    entry = _layers().get(_layer_key(x.shape, w.shape, x.dtype))
    if entry is None:
        if _recorded is not None:
            _recorded.append(("winograd", tuple(x.shape), tuple(w.shape), jnp.dtype(x.dtype)))
        return True
    return entry.get("choice") != "direct"


def _layer_inputs(x_shape, w_shape, y_shape, dtype, mesh):
    """Random x, w and dy for timing one layer as the step runs it: batch-sharded over `mesh` (so with the same
    threads per call and per-device shapes), w replicated. -> (x, w, dy, batch sharding, replicated sharding)."""
    rng = np.random.default_rng(0)
    batch, repl = NamedSharding(mesh, P(mesh.axis_names[0])), NamedSharding(mesh, P())
    x = jax.device_put(jnp.asarray(rng.standard_normal(x_shape), dtype), batch)
    w = jax.device_put(jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:3])), dtype), repl)
    dy = jax.device_put(jnp.asarray(rng.standard_normal(y_shape), dtype), batch)
    return x, w, dy, batch, repl


def _fastest(calls: dict) -> dict[str, float]:
    """{name: (jitted call, args)} -> {name: seconds}, the fastest of _LAYER_ROUNDS alternating calls of each
    after one to compile and warm up."""
    for call, args in calls.values():
        jax.block_until_ready(call(*args))
    best = {name: float("inf") for name in calls}
    for _ in range(_LAYER_ROUNDS):
        for name, (call, args) in calls.items():
            started = time.perf_counter()
            jax.block_until_ready(call(*args))
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _layer_seconds(x_shape, w_shape, dtype, mesh) -> dict[str, float]:
    """Winograd's and the direct kernels' forward + both gradients of one 3x3 stride-1 layer (_fastest)."""
    x, w, dy, batch, repl = _layer_inputs(x_shape, w_shape, x_shape[:3] + w_shape[3:], dtype, mesh)
    winograd = winograd_conv3x3 if jnp.dtype(dtype) == jnp.float32 else winograd_bf16_conv3x3
    kernels = {"winograd": winograd, "direct": lambda a, b: conv_nhwc(a, b, *_SAME_3X3)}
    calls = {}
    for name, conv in kernels.items():
        def passes(a, b, g, conv=conv):
            y, vjp = jax.vjp(conv, a, b)
            return (y, *vjp(g))
        calls[name] = (jax.jit(passes, in_shardings=(batch, repl, batch), out_shardings=(batch, batch, repl)),
                       (x, w, dy))
    return _fastest(calls)


def _strided_seconds(x_shape, w_shape, dtype, strides, padding, mesh) -> dict[str, float]:
    """Each data-gradient and weight-gradient kernel a strided layer supports, alone (_fastest)."""
    y_shape = jax.eval_shape(lambda a, b: conv_nhwc(a, b, strides, padding), jax.ShapeDtypeStruct(x_shape, dtype),
                             jax.ShapeDtypeStruct(w_shape, dtype)).shape
    x, w, dy, batch, repl = _layer_inputs(x_shape, w_shape, y_shape, dtype, mesh)
    kernels = {"data_direct": (_backward_data, (dy, w), x_shape, batch)}
    if col2im_supports(w_shape, strides):
        kernels["data_col2im"] = (_col2im_backward_data, (dy, w), x_shape, batch)
    if w_shape[3] % 16 == 0:
        kernels["weights_direct"] = (_backward_weights, (x, dy), w_shape, repl)
        kernels["weights_im2col"] = (_im2col_backward_weights, (x, dy), w_shape, repl)
    return _fastest({name: (jax.jit(lambda a, b, kernel=kernel, shape=shape: kernel(a, b, shape, strides, padding),
                                    out_shardings=out), args)
                     for name, (kernel, args, shape, out) in kernels.items()})


def _faster(seconds: dict, prefix: str, default: str, other: str) -> str:
    """`other` where seconds[prefix + other] was measured and beat seconds[prefix + default] by _LAYER_MIN_GAIN
    (below that it is noise), else `default`."""
    mine, theirs = (seconds.get(prefix + name, float("inf")) for name in (default, other))
    return other if theirs * _LAYER_MIN_GAIN < mine else default


def choose_layers(trace, mesh) -> dict[str, str]:
    """Measures Winograd against the direct kernels for each layer shape Winograd supports in the computation that
    `trace()` traces (say, lambda: jax.eval_shape(step_fn, state, batch)), and each strided layer's gradient
    kernels (oneDNN's against col2im's and im2col's matmuls), and caches the choices per CPU model and jax version,
    under the same file lock as perf.choose; then the next trace of the step uses them (winograd_measured,
    strided_gradients_measured). A few seconds per shape, once: the training loop calls it for runs of
    perf.TUNE_MIN_STEPS steps or more. -> {layer key: choice} of the shapes measured now."""
    global _recorded
    if not perf.layer_tuning_enabled() or load() is not None:
        return {}
    _recorded = []
    try:
        trace()
    finally:
        shapes, _recorded = list(dict.fromkeys(_recorded)), None
    measured = {}
    if shapes:
        with perf.locked_table(_layer_table_path()) as table:
            for kind, x_shape, w_shape, dtype, *conv in shapes:
                key = _layer_key(x_shape, w_shape, dtype) if kind == "winograd" else _strided_key(
                    x_shape, w_shape, dtype, *conv)
                if key in table:
                    continue
                if kind == "winograd":
                    seconds = _layer_seconds(x_shape, w_shape, dtype, mesh)
                    entry = {"choice": _faster(seconds, "", "winograd", "direct")}
                    measured[key] = entry["choice"]
                else:
                    seconds = _strided_seconds(x_shape, w_shape, dtype, *conv, mesh)
                    weights = "im2col" if im2col_weight_gradient(dtype, w_shape, conv[0]) else "direct"
                    entry = {"data": _faster(seconds, "data_", "direct", "col2im"),
                             "weights": _faster(seconds, "weights_", weights,
                                                "direct" if weights == "im2col" else "im2col"),
                             "strides": list(conv[0]), "padding": list(conv[1])}
                    measured[key] = f"data {entry['data']}, weights {entry['weights']}"
                table[key] = {**entry, "seconds": seconds, "x": list(x_shape), "w": list(w_shape),
                              "dtype": dtype.name, "identity": perf.cpu_identity(),
                              "measured_at": time.strftime("%Y-%m-%d %H:%M")}
                logging.info("convolution %s x %s (%s) on %s: %s (ms: %s; cached)", x_shape, w_shape, dtype.name,
                             perf.cpu_identity()["cpu"], measured[key],
                             ", ".join(f"{k} {1e3 * v:.1f}" for k, v in seconds.items()))
            _layer_choices[_layer_table_path()] = dict(table)
    return measured


_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def supports(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
             batch_group_count, preferred_element_type) -> bool:
    """Whether the kernel covers this call (else it goes to lax.conv_general_dilated)."""
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) if dimension_numbers else None
    return (lhs.ndim == 4 and dims == _NHWC and lhs.dtype == rhs.dtype
            and lhs.dtype in (jnp.float32, jnp.bfloat16) and len(window_strides) == 2
            and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and (preferred_element_type is None or preferred_element_type == lhs.dtype))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, winograd: bool = False):
    """`lax.conv_general_dilated`'s signature; oneDNN where `supports`, else lax itself.

    winograd: 3x3 stride-1 SAME layers by `winograd_conv3x3` (float32) or `winograd_bf16_conv3x3` (bfloat16,
    on CPUs with bfloat16 hardware) where they apply (model.conv=winograd)."""
    problem = load()  # registers the FFI targets (once per process)
    if problem is not None:
        raise RuntimeError(f"the oneDNN convolution kernel is unavailable: {problem}")
    if not supports(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                    batch_group_count, preferred_element_type):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    (top, bottom), (left, right) = padding
    if min(top, bottom, left, right) < 0:  # cropping, which oneDNN does not do
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    strides, pads = tuple(int(s) for s in window_strides), (int(top), int(bottom), int(left), int(right))
    if winograd and winograd_supports(lhs, rhs, strides, pads) and winograd_measured(lhs, rhs):
        return winograd_conv3x3(lhs, rhs)
    if winograd and winograd_bf16_supports(lhs, rhs, strides, pads) and winograd_measured(lhs, rhs):
        return winograd_bf16_conv3x3(lhs, rhs)
    return conv_nhwc(lhs, rhs, strides, pads)


_HLO_CALL = re.compile(r"= (?:f32|bf16)\[([\d,]*)\]\S* custom-call\([^)]*\), "
                       r"custom_call_target=\"contrastood_conv_(\w+)\", operand_layout_constraints="
                       r"\{(?:f32|bf16)\[([\d,]*)\]\S*, (?:f32|bf16)\[([\d,]*)\][^\n]*?"
                       r"padding = dense<([^>]*)>[^\n]*?strides = dense<([^>]*)>")


def _dense(text: str, size: int) -> list[int]:
    values = [int(v) for v in text.strip("[]").split(",")]
    return values * size if len(values) == 1 else values  # MLIR prints a splat as one value


def _taps(size: int, out: int, k: int, stride: int, pad_lo: int) -> int:
    """Kernel taps that land inside the input, summed over output positions (padding costs nothing)."""
    return sum(1 for p in range(out) for j in range(k) if 0 <= p * stride - pad_lo + j < size)


def hlo_flops(hlo_text: str) -> float:
    """FLOPs of the oneDNN convolutions in a compiled module's text (XLA's cost analysis counts none).

    Forward, backward-data and backward-weights each multiply-add every kernel tap that lands inside
    the input once per (image, input channel, output channel): the count XLA gives its own convolutions.
    Winograd calls count as the direct convolutions they replace (model FLOPs), not their 4x fewer."""
    total = 0.0
    for out, target, a, b, padding, strides in _HLO_CALL.findall(hlo_text):
        out, a, b = ([int(d) for d in s.split(",") if d] for s in (out, a, b))
        pt, _, pl, _ = _dense(padding, 4)
        sh, sw = _dense(strides, 2)
        if target == "Forward":  # x [n,h,w,c], w [kh,kw,c,o] -> y [n,p,q,o]
            x, w, y = a, b, out
        elif target in ("WinoForward", "Wino2Forward"):  # x, u [36 or 16,c,o] -> y: the 3x3 convolution it computes
            x, w, y = a, [3, 3, b[1], b[2]], out
        elif target in ("WinoBackwardWeights", "Wino2BackwardWeights"):  # x, dy -> du [36 or 16,c,o]
            x, w, y = a, [3, 3, out[1], out[2]], b
        elif target in ("BackwardData", "Col2imBackwardData"):  # dy, w -> dx
            x, w, y = out, b, a
        else:  # x, dy -> dw
            x, w, y = a, out, b
        taps = _taps(x[1], y[1], w[0], sh, pt) * _taps(x[2], y[2], w[1], sw, pl)
        total += 2.0 * x[0] * taps * w[2] * w[3]
    return total

r"""Milliseconds per convolution layer (forward + backward-data + backward-weights): XLA's kernels,
contrastood's oneDNN kernels (contrastood.onednn_conv) direct and with Winograd where model.conv=winograd
uses it (other layers repeat the direct time), and PyTorch's channels_last (oneDNN too), side
by side in one run.

  python benchmarks/conv_throughput.py                         # the tiny ResNet's layers, 256 images
  python benchmarks/conv_throughput.py --net=resnet18 --batch=128 --dtype=bfloat16

Each row is one layer shape of the network (3x3 and 1x1 projections, strides 1 and 2, SAME padding),
"x N" how often it occurs; TOTAL weights rows by that count. This is where the train step's
convolution time goes; benchmarks/vs_pytorch.py measures the whole step. PyTorch columns are left
out when torch is not installed.
"""
from __future__ import annotations

import argparse
import functools
import time

from contrastood import host_memory

host_memory.configure()  # as in the train step: before JAX starts its CPU client

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastood import onednn_conv, perf  # noqa: E402

# (input size, in channels, out channels, kernel, stride) -> count, per network at 32 px
LAYERS = {
    "resnet_tiny": [((32, 3, 16, 3, 1), 1), ((32, 16, 16, 3, 1), 2), ((32, 16, 32, 3, 2), 1), ((16, 32, 32, 3, 1), 1),
                    ((32, 16, 32, 1, 2), 1), ((16, 32, 64, 3, 2), 1), ((8, 64, 64, 3, 1), 1), ((16, 32, 64, 1, 2), 1)],
    "resnet18": [((32, 3, 64, 3, 1), 1), ((32, 64, 64, 3, 1), 4), ((32, 64, 128, 3, 2), 1), ((16, 128, 128, 3, 1), 3),
                 ((32, 64, 128, 1, 2), 1), ((16, 128, 256, 3, 2), 1), ((8, 256, 256, 3, 1), 3),
                 ((16, 128, 256, 1, 2), 1), ((8, 256, 512, 3, 2), 1), ((4, 512, 512, 3, 1), 3),
                 ((8, 256, 512, 1, 2), 1)],
}


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def jax_ms(conv, x, w, stride: int, options: dict, repeats: int) -> float:
    def forward_backward(x, w):
        y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
                         x, w)
        return vjp(y)

    step = jax.jit(forward_backward, compiler_options=options)
    return _ms(lambda: jax.block_until_ready(step(x, w)), repeats)


def _winograd_applies(x, w, stride: int) -> bool:
    """Whether model.conv=winograd replaces this layer's direct kernels (else its column repeats oneDNN's)."""
    pads = (w.shape[0] // 2,) * 4 if stride == 1 else (0, 1, 0, 1)  # SAME on these even sizes
    supports = onednn_conv.winograd_bf16_supports if x.dtype == jnp.bfloat16 else onednn_conv.winograd_supports
    return supports(x, w, (stride, stride), pads)


def torch_ms(batch: int, size: int, cin: int, cout: int, k: int, stride: int, dtype: str, repeats: int) -> float:
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x = torch.randn(batch, cin, size, size).to(memory_format=torch.channels_last).to(torch_dtype).requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
    conv = conv.to(memory_format=torch.channels_last).to(torch_dtype)

    def step():
        y = conv(x)
        y.backward(y)
    return _ms(step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="resnet_tiny", choices=sorted(LAYERS))
    parser.add_argument("--batch", type=int, default=256, help="images per call (a step's two views of 128)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    problem = onednn_conv.load()
    try:
        import torch

        has_torch = True
    except ImportError:
        has_torch = False
    identity = perf.cpu_identity()
    print(f"CPU {identity['cpu']} ({identity['cores']} cores; {identity['isa']}), jax {jax.__version__}, "
          f"oneDNN {onednn_conv.version() or 'unavailable: ' + str(problem)}"
          + (f", torch {torch.__version__}" if has_torch else ", no torch"))
    print(f"{args.net}, batch {args.batch}, {args.dtype}; ms per forward + both gradients")
    options = {"xla": dict(perf.CPU_CANDIDATES[perf.DEFAULT_CANDIDATE["xla"]]),
               "onednn": dict(perf.CPU_CANDIDATES[perf.DEFAULT_CANDIDATE["onednn"]])}
    totals: dict[str, float] = {}
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    for (size, cin, cout, k, stride), count in LAYERS[args.net]:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), dtype)
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.1, dtype)
        row = {"XLA": jax_ms(jax.lax.conv_general_dilated, x, w, stride, options["xla"], args.repeats)}
        if problem is None:
            row["oneDNN"] = jax_ms(onednn_conv.conv_general_dilated, x, w, stride, options["onednn"], args.repeats)
            winograd = functools.partial(onednn_conv.conv_general_dilated, winograd=True)
            row["Winograd"] = (jax_ms(winograd, x, w, stride, options["onednn"], args.repeats)
                               if _winograd_applies(x, w, stride) else row["oneDNN"])
        if has_torch:
            row["PyTorch cl"] = torch_ms(args.batch, size, cin, cout, k, stride, args.dtype, args.repeats)
        for name, ms in row.items():
            totals[name] = totals.get(name, 0.0) + count * ms
        print(f"{size:>3}px {cin:>3}->{cout:<3} {k}x{k} /{stride} x{count}: "
              + "  ".join(f"{name} {ms:7.1f}" for name, ms in row.items()), flush=True)
    print("TOTAL: " + "  ".join(f"{name} {ms:.1f} ms" for name, ms in totals.items()))


if __name__ == "__main__":
    main()

r"""Throughput of the on-device SimCLR augmentation (`two_views`) after compilation.

  python benchmarks/augment_throughput.py [--batch 256] [--iters 20]

Prints numbers, asserts nothing. Uses real CIFAR-10 test images from ../shared/data when present
(colour jitter cost does not depend on content, but this keeps the numbers honest), random uint8
otherwise. On a CPU the number bounds how fast a CPU-only smoke run can go; on an accelerator the
augmentation runs inside the train-step jit, so its cost there is a fraction of the step.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from contrastood import augment  # noqa: E402

CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10-test.npz"


def _load_images(batch: int) -> tuple[np.ndarray, str]:
    if CIFAR_TEST.exists():
        with np.load(CIFAR_TEST) as data:
            images = data["images"][:batch]
        if len(images) == batch:
            return images, f"CIFAR-10 test[:{batch}]"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8), "random uint8 32x32"


def _time(fn, *args, iters: int) -> tuple[float, float]:
    """(compile + first call seconds, best-of-iters seconds per call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(0), *args))
    first = time.perf_counter() - start
    best = float("inf")
    for i in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.PRNGKey(i + 1), *args))
        best = min(best, time.perf_counter() - start)
    return first, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    images, source = _load_images(args.batch)
    images = jax.device_put(images)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch} ({source})")

    config = augment.AugmentConfig()
    two_views = jax.jit(augment.two_views, static_argnums=2)
    first, best = _time(two_views, images, config, iters=args.iters)
    print(f"two_views (SimCLR, {config}):\n"
          f"  compile+first {first:.2f} s, best {best * 1e3:.1f} ms/batch -> "
          f"{args.batch / best:,.0f} images/s ({2 * args.batch / best:,.0f} views/s)")

    no_color = augment.AugmentConfig(color_prob=0.0, grayscale_prob=0.0)
    first, best = _time(two_views, images, no_color, iters=args.iters)
    print(f"two_views, crop+flip only: best {best * 1e3:.1f} ms/batch -> {args.batch / best:,.0f} images/s")

    supervised = jax.jit(augment.supervised_augment)
    first, best = _time(supervised, images, iters=args.iters)
    print(f"supervised_augment (pad 4 crop + flip): best {best * 1e3:.1f} ms/batch -> "
          f"{args.batch / best:,.0f} images/s")


if __name__ == "__main__":
    main()

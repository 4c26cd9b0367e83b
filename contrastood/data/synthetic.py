r"""A synthetic image-folder dataset of real image files, for runs, benchmarks and tests without a download.

  python -m contrastood.data.synthetic /tmp/contrastood_synthetic [--train=2000] [--size=224]

writes ROOT/{train,test}/class_K/NNNNN.jpg for `classes` in-distribution classes and ROOT/ood/... for
`ood_classes` others (new shapes), as JPEGs at `size` px (quality 90). Each class is a shape (disc,
square, triangle, ring, cross, stripes ...) of a class colour on a random gradient, at a random place,
scale and orientation, with pixel noise: learnable, and not separable by colour statistics alone.
`configs/folder.py:cpu` trains on it; `benchmarks/input_throughput.py` times the pipeline on it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import os

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross", "stripes", "diamond", "dots")


def draw(rng: np.random.Generator, shape: str, colour: tuple[int, int, int], size: int) -> np.ndarray:
    """One uint8 [size, size, 3] image of `shape`."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((1, size, 1))
    image = Image.fromarray(background.astype(np.uint8))
    canvas = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.15, 0.35)
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    fill = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "disc":
        canvas.ellipse(box, fill=fill)
    elif shape == "ring":
        canvas.ellipse(box, outline=fill, width=max(2, int(radius / 3)))
    elif shape in ("square", "diamond", "triangle"):
        sides = {"square": 4, "diamond": 4, "triangle": 3}[shape]
        offset = angle + (math.pi / 4 if shape == "diamond" else 0)
        points = [(cx + radius * math.cos(offset + 2 * math.pi * k / sides),
                   cy + radius * math.sin(offset + 2 * math.pi * k / sides)) for k in range(sides)]
        canvas.polygon(points, fill=fill)
    elif shape == "cross":
        width = max(2, int(radius / 2.5))
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(theta), radius * math.sin(theta)
            canvas.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=width)
    elif shape == "stripes":
        period = max(4, int(radius / 2))
        for x in range(0, 2 * size, 2 * period):
            canvas.line([(x, 0), (x - size, size)], fill=fill, width=period)
    else:  # dots
        for _ in range(12):
            x, y = rng.uniform(0, size, 2)
            r = radius / 5
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    pixels = np.asarray(image, np.int16) + rng.integers(-12, 13, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _colour(k: int) -> tuple[int, int, int]:
    hue = (k * 0.61803398875) % 1.0  # golden-ratio hues: distinct for any number of classes
    return tuple(int(255 * (0.5 + 0.45 * math.cos(2 * math.pi * (hue + offset)))) for offset in (0, 1 / 3, 2 / 3))


def write_folder(root, *, train: int = 2000, test: int = 400, ood: int = 400, size: int = 224, classes: int = 4,
                 ood_classes: int = 2, seed: int = 0, quality: int = 90, workers: int | None = None) -> epath.Path:
    """Writes the dataset (see the module docstring) and returns its root; existing files are kept."""
    if classes + ood_classes > len(SHAPES):
        raise ValueError(f"at most {len(SHAPES)} classes in all, got {classes} + {ood_classes}")
    root = epath.Path(root)
    jobs = []
    for split, count, first in (("train", train, 0), ("test", test, 0), ("ood", ood, classes)):
        num = ood_classes if split == "ood" else classes
        for i in range(count):
            k = first + i % num
            jobs.append((root / split / f"class_{k}" / f"{i:05d}.jpg", k, (seed, ("train", "test", "ood").index(split), i)))
    for directory in {path.parent for path, _, _ in jobs}:
        directory.mkdir(parents=True, exist_ok=True)

    def write(job):
        path, k, key = job
        if path.exists():
            return
        image = draw(np.random.default_rng(list(key)), SHAPES[k], _colour(k), size)
        with path.open("wb") as f:
            Image.fromarray(image).save(f, format="JPEG", quality=quality)

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        list(pool.map(write, jobs))
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--ood", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_folder(args.root, train=args.train, test=args.test, ood=args.ood, size=args.size,
                        classes=args.classes, seed=args.seed)
    print(f"wrote {args.train} train, {args.test} test and {args.ood} OOD images of {args.size} px under {root}")


if __name__ == "__main__":
    main()

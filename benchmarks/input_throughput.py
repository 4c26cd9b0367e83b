r"""The train-input pipeline on image folders: images/s, and memory that does not grow with the dataset.

  python benchmarks/input_throughput.py                       # 2,000 and 20,000 JPEGs at 224x224
  python benchmarks/input_throughput.py --sizes=2000 --steps=20 --rss_steps=10   # quick

For each folder size it writes a synthetic JPEG folder (contrastood.data.synthetic, quality 90) to a
temporary directory, then prints
  - img/s of contrastood.data.pipeline.train_batches: read + Pillow decode + two SimCLR crops cut from
    the 224 px original and resized to --image_size + batch, on all local cores (decode threads);
  - the same work as a tf.data pipeline (read_file, decode_jpeg, sample_distorted_bounding_box crop,
    resize, batch; AUTOTUNE), the alternative the data module was measured against;
  - the peak RSS of a real `python -m contrastood.main` run of --rss_steps steps on the folder
    (configs/folder.py:cpu, tiny ResNet at --image_size), read from getrusage of that child alone,
    and the images/s its train step logged.
The RSS of the 20,000-image run should be within 1.2x of the 2,000-image run's (sources hold file
names, not pixels), and the pipeline's img/s at least what the train step consumes at that size.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from contrastood.data import pipeline, sources, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def contrastood_images_per_second(root: str, image_size: int, batch: int, steps: int, workers: int) -> float:
    source = sources.load(f"folder:{root}:train", image_size=image_size)
    crop = pipeline.HostCrop((0.08, 1.0), (3 / 4, 4 / 3))
    stream = pipeline.train_batches(source, global_batch_size=batch, seed=0, image_size=image_size, host_crop=crop,
                                    views=2, workers=workers, process_index=0, process_count=1)
    next(stream)  # thread start-up and the first batch
    start = time.perf_counter()
    for batch_arrays in itertools.islice(stream, steps):
        assert batch_arrays["image"].shape == (batch, 2, image_size, image_size, 3)
    seconds = time.perf_counter() - start
    stream.close()
    return steps * batch / seconds


def tf_data_images_per_second(root: str, image_size: int, batch: int, steps: int) -> float:
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(os.path.join(root, "train", "*", "*.jpg")))

    def crop(contents):
        shape = tf.io.extract_jpeg_shape(contents)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, tf.zeros([0, 0, 4]), area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.io.decode_and_crop_jpeg(contents, window, channels=3)
        return tf.cast(tf.image.resize(image, (image_size, image_size), antialias=True), tf.uint8)

    def two_views(path):
        contents = tf.io.read_file(path)
        return tf.stack([crop(contents), crop(contents)])

    dataset = (tf.data.Dataset.from_tensor_slices(files).repeat().shuffle(1024, seed=0)
               .map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .batch(batch).prefetch(2))
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - start)


def run_main_rss(root: str, workdir: str, image_size: int, steps: int) -> tuple[float, float | None]:
    """(peak RSS in MiB, train images/s logged) of one training run in a child process."""
    command = [sys.executable, "-m", "contrastood.main", f"--config=configs/folder.py:cpu,path={root},size={image_size}",
               f"--workdir={workdir}", f"--config.train.stage1_steps={steps // 2}",
               f"--config.train.stage2_steps={steps - steps // 2}", "--config.ood.run_after_training=False",
               "--config.clp.run_after_evaluation=False", f"--config.log_every_steps={max(1, steps // 5)}",
               f"--config.checkpoint_every_steps={steps}", f"--config.eval_every_steps={10 ** 9}"]
    probe = ("import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(out.stderr[-4000:] if out.returncode else ''); "
             "print('RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "print('RATES', ' '.join(l.split('images_per_sec=')[1].split(',')[0] for l in out.stderr.splitlines() "
             "if 'images_per_sec=' in l)); sys.exit(out.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"training run failed:\n{out.stderr[-3000:]}")
    rss_kb = int(re.search(r"RSS_KB (\d+)", out.stdout)[1])
    rates = [float(r) for r in re.search(r"RATES ?(.*)", out.stdout)[1].split()]
    return rss_kb / 1024, (float(np.median(rates[1:])) if len(rates) > 1 else (rates[0] if rates else None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000", help="folder sizes (training images)")
    parser.add_argument("--source_px", type=int, default=224)
    parser.add_argument("--image_size", type=int, default=64, help="the crops' (and the model's) size")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="batches timed per pipeline")
    parser.add_argument("--rss_steps", type=int, default=50, help="steps of the training run whose RSS is read")
    parser.add_argument("--workers", type=int, default=0, help="decode threads (0: one per core)")
    parser.add_argument("--no_tf", action="store_true", help="skip the tf.data comparison")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    workers = args.workers or pipeline.default_workers()
    print(f"{os.cpu_count()} CPUs, {workers} decode threads; JPEG {args.source_px} px -> two {args.image_size} px crops")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            root = os.path.join(tmp, f"folder_{size}")
            start = time.perf_counter()
            synthetic.write_folder(root, train=size, test=64, ood=64, size=args.source_px, workers=workers)
            written = time.perf_counter() - start
            row = {"images": size, "write_s": written,
                   "contrastood_img_s": contrastood_images_per_second(root, args.image_size, args.batch, args.steps,
                                                                      workers)}
            if not args.no_tf:
                row["tf_data_img_s"] = tf_data_images_per_second(root, args.image_size, args.batch, args.steps)
            row["peak_rss_mib"], row["train_img_s"] = run_main_rss(root, os.path.join(tmp, f"run_{size}"),
                                                                   args.image_size, args.rss_steps)
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"| images | contrastood input img/s | tf.data img/s | train step img/s (in the run) | peak RSS of a "
          f"{args.rss_steps}-step run |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        tf_rate = f"{r['tf_data_img_s']:.0f}" if "tf_data_img_s" in r else "-"
        train_rate = f"{r['train_img_s']:.0f}" if r["train_img_s"] else "-"
        print(f"| {r['images']:,} | {r['contrastood_img_s']:.0f} | {tf_rate} | {train_rate} | "
              f"{r['peak_rss_mib']:.0f} MiB |")
    if len(results) > 1:
        print(f"\nRSS ratio, {results[-1]['images']:,} vs {results[0]['images']:,} images: "
              f"{results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

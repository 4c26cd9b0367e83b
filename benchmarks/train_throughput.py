r"""Images per second of the full train step (two SimCLR views, L_con + lambda * L_class).

  python benchmarks/train_throughput.py                                  # tiny + resnet18, batch 128
  python benchmarks/train_throughput.py --models=resnet18 --batch=256 --dtype=bfloat16 --steps=5

Times the jitted step on all available devices after compilation, with the batch already on the
device (the input pipeline is not the cost: see benchmarks/augment_throughput.py). "img/s" counts
source images (each makes two views, i.e. two network passes); "passes/s" counts augmented views
through forward + backward, the unit to compare with a one-view supervised step.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from contrastood import config_lib, models, parallel, train


def benchmark(model_name: str, batch: int, steps: int, dtype: str, contrastive: bool) -> dict:
    config = config_lib.base_config("cpu")
    config_lib.apply_cpu_variant(config)
    config.data.train = "benchmark"
    config.model.name = model_name
    config.model.dtype = dtype
    config.model.proj_dim = 128
    config.train.batch_size = batch
    config.train.contrastive = contrastive
    mesh = parallel.create_mesh()
    config_lib.validate_config(config, mesh.devices.size)
    model = models.create_model(config.model, 10)
    schedule = train.learning_rate_schedule(config, 10, 10, 1)
    tx = train.create_optimizer(config, schedule)
    state = parallel.replicate(train.create_train_state(jax.random.key(0), model, tx, 32), mesh)
    step = train.jit_train_step(train.make_train_step(model, tx, config, 0, schedule), mesh)
    rng = np.random.default_rng(0)
    data = parallel.to_global({"image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
                               "label": rng.integers(0, 10, batch).astype(np.int32)}, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    views = 2 if contrastive else 1
    return dict(model=model_name, batch=batch, dtype=dtype, views=views, devices=mesh.devices.size,
                step_s=seconds, img_s=batch / seconds, passes_s=views * batch / seconds,
                gflop_s=flops / seconds / 1e9, compile_s=compile_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet_tiny,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--supervised", action="store_true", help="one view, class loss only")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    header = f"{'model':<12} {'batch':>5} {'dtype':<9} {'views':>5} {'dev':>3} {'step s':>8} {'img/s':>8} " \
             f"{'passes/s':>9} {'GFLOP/s':>8} {'compile s':>9}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        r = benchmark(name, args.batch, args.steps, args.dtype, not args.supervised)
        print(f"{r['model']:<12} {r['batch']:>5} {r['dtype']:<9} {r['views']:>5} {r['devices']:>3} "
              f"{r['step_s']:>8.3f} {r['img_s']:>8.1f} {r['passes_s']:>9.1f} {r['gflop_s']:>8.1f} "
              f"{r['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()

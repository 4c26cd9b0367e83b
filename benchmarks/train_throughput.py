r"""Images per second of the full train step (two SimCLR views, L_con + lambda * L_class), its FLOPs
and model FLOP utilisation, and the speed of evaluation feature extraction.

  python benchmarks/train_throughput.py                                  # tiny + resnet18, batch 128
  python benchmarks/train_throughput.py --models=resnet18 --dtype=float32,bfloat16 --steps=5

Times the jitted step on all available devices after compilation, with the batch already on the
device (the input pipeline is not the cost: see benchmarks/augment_throughput.py). "img/s" counts
source images (each makes two views, i.e. two network passes); "passes/s" counts augmented views
through forward + backward, the unit to compare with a one-view supervised step. GFLOP/step is
XLA's estimate for the whole step on all devices; MFU divides the achieved FLOP/s by the peak of
`contrastood.perf` (data sheet on TPUs/GPUs, a measured XLA matmul on CPUs). "extract img/s" is the
OOD feature-extraction step (forward only, eval batch 500) and "x train" its speed per image over a
training pass. Set XLA_FLAGS=--xla_force_host_platform_device_count=N before running to split a CPU.
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

from contrastood import host_memory

host_memory.configure()  # before JAX starts its CPU client; the benchmark's batch is already in memory

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastood import config_lib, models, onednn_conv, parallel, perf, train  # noqa: E402
from contrastood.ood import features  # noqa: E402


def benchmark(model_name: str, batch: int, steps: int, dtype: str, contrastive: bool,
              eval_batch: int = 496, image_size: int = 32, min_seconds: float = 0.0,
              options: dict | None = None, conv: str = "auto") -> dict:
    """One row of the table; steps are timed until both `steps` ran and `min_seconds` passed.

    `options`: the XLA compiler options (default: contrastood.perf.compiler_options()); `conv`: model.conv."""
    options = perf.compiler_options() if options is None else options
    step = build_step(model_name, batch, dtype, contrastive, image_size, options, conv)
    seconds, step["state"] = time_steps(lambda s: step["compiled"](s, step["data"]), step["state"], steps, min_seconds)
    flops, mesh = step["flops"], step["mesh"]
    views = 2 if contrastive else 1
    peak, peak_source = perf.peak_flops_per_device(dtype)
    extract_s = _extract_seconds(step["model"], step["state"], mesh, eval_batch, steps, image_size, min_seconds,
                                 options)
    return dict(model=model_name, batch=batch, dtype=dtype, views=views, devices=mesh.devices.size,
                step_s=seconds, img_s=batch / seconds, passes_s=views * batch / seconds,
                gflop_step=flops * mesh.devices.size / 1e9, gflop_s=flops * mesh.devices.size / seconds / 1e9,
                mfu=perf.mfu(flops, 1.0 / seconds, peak), peak_source=peak_source,
                peak_tflops=peak * mesh.devices.size / 1e12,
                extract_img_s=eval_batch / extract_s, compile_s=step["compile_s"])


def build_step(model_name: str, batch: int, dtype: str, contrastive: bool, image_size: int, options: dict,
               conv: str) -> dict:
    """The compiled train step with its state and an on-device batch, to time it again and again."""
    config = config_lib.base_config()
    config_lib.apply_cpu_variant(config)
    config.data.train = "benchmark"
    config.model.name = model_name
    config.model.dtype = dtype
    config.model.conv = conv
    config.model.proj_dim = 128
    config.train.batch_size = batch
    config.train.contrastive = contrastive
    config.data.image_size = image_size
    mesh = parallel.create_mesh()
    model = models.create_model(config.model, 10, image_size=image_size)
    schedule = train.learning_rate_schedule(config, 10, 10, 1)
    tx = train.create_optimizer(config, schedule)
    state = parallel.replicate(train.create_train_state(jax.random.key(0), model, tx, image_size), mesh)
    step_fn = train.make_train_step(model, tx, config, 0, schedule)
    step = train.jit_train_step(step_fn, mesh, options)
    rng = np.random.default_rng(0)
    data = parallel.to_global({"image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
                               "label": rng.integers(0, 10, batch).astype(np.int32)}, mesh)
    if model.conv_impl in ("onednn", "winograd"):  # as a long training run does: each layer's kernels measured once
        for key, choice in onednn_conv.choose_layers(lambda: jax.eval_shape(lambda s, b: step_fn(s, b), state, data),
                                                     mesh).items():
            print(f"measured once on this CPU (cached): {key.rsplit('workload=', 1)[-1]} -> {choice}", flush=True)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    return dict(compiled=compiled, state=state, data=data, model=model, mesh=mesh, compile_s=compile_s,
                flops=perf.step_flops(compiled))  # flops: per device


def time_steps(run_step, state, steps: int, min_seconds: float = 0.0):
    """-> (seconds per step after one warm-up call, final state); the state is donated, so threaded."""
    state, metrics = run_step(state)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    done = 0
    while done < steps or time.perf_counter() - t0 < min_seconds:
        state, metrics = run_step(state)
        done += 1
        if done % 10 == 0 or done >= steps:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / done, state


def _extract_seconds(model, state, mesh, eval_batch: int, steps: int, image_size: int,
                     min_seconds: float = 0.0, options: dict | None = None) -> float:
    """Seconds per batch of the OOD feature-extraction step (pre_logits + logits, no ODIN)."""
    extract = jax.jit(features.make_extract_step(model, [], None),
                      in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                      out_shardings=parallel.replicated(mesh),
                      compiler_options=perf.compiler_options() if options is None else options)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = np.random.default_rng(1).integers(0, 256, (eval_batch, image_size, image_size, 3), dtype=np.uint8)
    batch = parallel.to_global({"image": images}, mesh)
    jax.block_until_ready(extract(variables, batch))
    t0 = time.perf_counter()
    done = 0
    while done < steps or time.perf_counter() - t0 < min_seconds:
        out = extract(variables, batch)
        done += 1
        if done % 10 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet_tiny,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--supervised", action="store_true", help="one view, class loss only")
    parser.add_argument("--eval_batch", type=int, default=496, help="feature-extraction batch")
    parser.add_argument("--image_size", type=int, default=32, help="input resolution (64+ gets the ImageNet stem)")
    parser.add_argument("--cpu_tuning", default="on", choices=["on", "off", "both"],
                        help="on: contrastood.perf.compiler_options() (the cached measured choice, else the "
                             "default set); off: XLA's defaults")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} devices of kind {jax.devices()[0].device_kind!r}, "
          f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    header = (f"{'model':<12} {'batch':>5} {'dtype':<9} {'XLA opts':<8} {'views':>5} {'dev':>3} {'step s':>7} {'img/s':>7} "
              f"{'passes/s':>8} {'GFLOP/step':>10} {'GFLOP/s':>7} {'MFU':>6} {'extract img/s':>13} "
              f"{'x train':>7} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    sources = set()
    tunings = ["off", "on"] if args.cpu_tuning == "both" else [args.cpu_tuning]
    for name in args.models.split(","):
        for dtype, tuning in itertools.product(args.dtype.split(","), tunings):
            os.environ[perf.DISABLE_ENV] = "1" if tuning == "on" else "0"
            r = benchmark(name, args.batch, args.steps, dtype, not args.supervised, args.eval_batch, args.image_size)
            sources.add(f"{dtype}: {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']})")
            print(f"{r['model']:<12} {r['batch']:>5} {r['dtype']:<9} {tuning:<8} {r['views']:>5} {r['devices']:>3} "
                  f"{r['step_s']:>7.3f} {r['img_s']:>7.1f} {r['passes_s']:>8.1f} {r['gflop_step']:>10.1f} "
                  f"{r['gflop_s']:>7.1f} {100 * r['mfu']:>5.1f}% {r['extract_img_s']:>13.1f} "
                  f"{r['extract_img_s'] / r['passes_s']:>7.1f} {r['compile_s']:>9.1f}", flush=True)
    for source in sorted(sources):
        print("MFU peak, all devices:", source)


if __name__ == "__main__":
    main()

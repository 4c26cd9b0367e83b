"""Two-stage training loop of Winkens et al. 2020: SimCLR pre-training, then L_con + lambda * L_class.

Both stages run in one compiled step: the stage is a function of the step counter, so a run resumes
mid-stage from any checkpoint and the device count never changes the program. The step is pure and
jitted at the call site over a ('data',) mesh (see `parallel`). Checkpoints, the workdir lock,
signals and summaries are owned by `checkpointing`, `workdir`, `preemption` and `summaries`.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from contrastood import (augment, checkpointing, config_lib, errors, losses, models, onednn_conv, parallel, perf,
                         preemption, summaries, workdir as workdir_lib)
from contrastood.checkpointing import TrainState
from contrastood.data import pipeline, sources

OPTIMIZERS = ("lars", "sgd")
SCHEDULES = ("per_stage", "continuous")


# ----------------------------------------------------------------------------- optimisation


def learning_rate_schedule(config: ml_collections.ConfigDict, stage1_steps: int, stage2_steps: int,
                           warmup_steps: int) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero (paper, Appendix B).

    train.schedule="per_stage": each stage warms up and decays on its own; "continuous": one warm-up
    and one cosine over both stages ("without restarts").
    """
    peak = config.train.learning_rate

    def stage(num_steps: int) -> optax.Schedule:
        warmup = min(warmup_steps, max(num_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)

    if config.train.schedule == "continuous" or stage1_steps == 0:
        return stage(stage1_steps + stage2_steps)
    if stage2_steps == 0:
        return stage(stage1_steps)
    return optax.join_schedules([stage(stage1_steps), stage(stage2_steps)], [stage1_steps])


def _decay_mask(params):
    """True for kernels; BatchNorm parameters and biases are excluded from decay and trust ratio."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    t = config.train
    if t.optimizer == "lars":
        return optax.lars(schedule, weight_decay=t.weight_decay, weight_decay_mask=_decay_mask,
                          trust_ratio_mask=_decay_mask, momentum=t.momentum)
    if t.optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(t.weight_decay, _decay_mask),
                           optax.sgd(schedule, momentum=t.momentum))
    raise errors.ConfigError(f"train.optimizer={t.optimizer!r}; use one of {OPTIMIZERS}")


def create_train_state(key: jax.Array, model: models.ContrastiveResNet, tx: optax.GradientTransformation,
                       image_size: int) -> TrainState:
    variables = model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params))


def abstract_train_state(model, tx, config, mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of a TrainState, without computing anything."""
    shapes = jax.eval_shape(functools.partial(create_train_state, model=model, tx=tx,
                                              image_size=config.data.image_size), jax.random.key(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


# ----------------------------------------------------------------------------- steps


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: models.ContrastiveResNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, stage1_steps: int, schedule: optax.Schedule, *,
                    host_crops: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the pure step function (state, global batch) -> (state, metrics).

    `host_crops`: the batch's images are [B, V, H, W, 3] crops the host cut from the original images
    (data.pipeline); the device adds flip and colour distortion. Rows labelled -1 (data.unlabelled)
    enter the contrastive loss only.
    """
    t = config.train
    contrastive = bool(t.contrastive)
    aug_config = augment.AugmentConfig.from_mapping({**config.augment.to_dict(), "crop": not host_crops})
    base_key = jax.random.key(config.seed + 1)
    masked = bool(config.data.unlabelled)

    def make_views(key, images):
        if host_crops and t.augmentation == "simclr":
            return jnp.concatenate(augment.views_of_host_crops(key, images, aug_config), axis=0)
        if contrastive:
            v1, v2 = augment.two_views(key, images, aug_config)
            return jnp.concatenate([v1, v2], axis=0)
        if t.augmentation == "standard":
            return augment.supervised_augment(key, images)
        return augment.augment_batch(key, images, aug_config)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels = batch["image"], batch["label"]
        key = jax.random.fold_in(base_key, state.step)
        views = make_views(key, images)
        # Stage 1 trains L_con only; stage 2 adds lambda * L_class. Without L_con the run is stage 2 only.
        class_weight = jnp.where(state.step >= stage1_steps, t.class_weight, 0.0) if contrastive else 1.0

        def loss_fn(params):
            outputs, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, views,
                                            train=True, mutable=["batch_stats"])
            metrics = {}
            loss = 0.0
            class_labels = labels
            if contrastive:
                z1, z2 = jnp.split(outputs["proj"], 2)
                con_loss, con_acc = losses.nt_xent(z1, z2, t.temperature)
                metrics.update(contrastive_loss=con_loss, contrastive_accuracy=con_acc)
                loss = con_loss
                class_labels = jnp.concatenate([labels, labels])  # both views carry the label
            mask = class_labels >= 0 if masked else None
            class_loss, accuracy = losses.smoothed_cross_entropy(outputs["logits"], jnp.maximum(class_labels, 0),
                                                                 t.label_smoothing, mask)
            metrics.update(class_loss=class_loss, accuracy=accuracy)
            loss = loss + class_weight * class_loss
            if contrastive and t.normalize_loss_weights:
                loss = loss / (1.0 + class_weight)
            metrics["loss"] = loss
            return loss, (new_vars["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        # A finite loss and gradient can still give a state that poisons every resume (lr 1e30 gives
        # parameters ~1e28, whose squared norm, which LARS needs, overflows): the state that would be
        # saved must have a finite global norm, so a checkpoint is never poisoned.
        metrics.update(learning_rate=schedule(state.step), grad_norm=grad_norm,
                       loss_finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm),
                       state_finite=jnp.isfinite(optax.tree.norm((params, batch_stats))) & _all_finite(opt_state))
        return new_state, metrics

    return train_step


def make_eval_step(model: models.ContrastiveResNet) -> Callable:
    """Counts correct predictions on a padded, masked global batch."""

    def eval_step(state, batch: dict) -> dict:
        outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              augment.to_float(batch["image"]), train=False)
        mask = batch["mask"].astype(jnp.float32)
        correct = (jnp.argmax(outputs["logits"], -1) == batch["label"]) * mask
        return {"correct": correct.sum(), "count": mask.sum()}

    return eval_step


def jit_train_step(step_fn, mesh, options: dict | None = None) -> Callable:
    """State replicated, batch sharded along 'data'; the old state's buffers are donated."""
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=(0,),
                   compiler_options=perf.compiler_options() if options is None else options)


def jit_eval_step(step_fn, mesh, options: dict | None = None) -> Callable:
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=repl,
                   compiler_options=perf.compiler_options() if options is None else options)


def tuned_options(step_fn, mesh, state: TrainState, batch: dict, workload: str, conv: str = "xla") -> dict:
    """The XLA:CPU options for this step: measured on it (a copy of the state, the first batch) the first
    time this CPU meets this workload, then cached (perf.choose)."""

    def seconds_per_step(options: dict) -> float:
        compiled = jit_train_step(step_fn, mesh, options).lower(state, batch).compile()
        trial = jax.tree.map(jnp.copy, state)
        trial, metrics = compiled(trial, batch)  # warm-up
        jax.block_until_ready(metrics)
        started, steps = time.perf_counter(), 0
        while steps < 2 or (time.perf_counter() - started < 1.0 and steps < 10):
            trial, metrics = compiled(trial, batch)
            jax.block_until_ready(metrics)
            steps += 1
        return (time.perf_counter() - started) / steps

    return perf.choose(workload, seconds_per_step, conv)


def evaluate_accuracy(eval_step, state, source: sources.Source, config: ml_collections.ConfigDict, mesh) -> float:
    """Top-1 accuracy over every example of the split exactly once (padding is masked)."""
    correct = count = 0.0
    stream = pipeline.eval_batches(source, global_batch_size=config.eval_batch_size,
                                   image_size=config.data.image_size, workers=config.data.num_workers)
    for batch in stream:
        out = eval_step(state, parallel.to_global({k: batch[k] for k in ("image", "label", "mask")}, mesh))
        correct += float(out["correct"])
        count += float(out["count"])
    return correct / max(count, 1.0)


# ----------------------------------------------------------------------------- the loop


def check_training_labels(source: sources.Source, config: ml_collections.ConfigDict) -> None:
    """Every class 0..num_classes-1 present with >= 2 examples, before anything is compiled."""
    labels = np.asarray(source.labels)
    if labels.size == 0:
        raise errors.DataError(f"dataset {source.name!r} is empty")
    if source.num_classes == 0:
        raise errors.DataError(f"the training set {source.name!r} is unlabelled; stage 2 needs labels (unlabelled "
                               "images go to --config.data.unlabelled)")
    if labels.min() < 0 or labels.max() >= config.data.num_classes:
        raise errors.ConfigError(f"dataset {source.name!r} has labels in [{labels.min()}, {labels.max()}] but "
                                 f"data.num_classes={config.data.num_classes}; set --config.data.num_classes or "
                                 "select classes with '#classes=...' in the spec")
    counts = np.bincount(labels, minlength=config.data.num_classes)
    sparse = [c for c in range(config.data.num_classes) if counts[c] < 2]
    if sparse:
        raise errors.ConfigError(
            f"data.num_classes={config.data.num_classes} but classes {sparse[:10]} have fewer than 2 training examples "
            f"in {source.name!r} ({source.num_classes} classes present); set --config.data.num_classes="
            f"{source.num_classes} or select classes with '#classes=...'")


def _load(spec: str, config: ml_collections.ConfigDict) -> sources.Source:
    return sources.load(spec, image_size=config.data.image_size, seed=config.seed,
                        data_dir=config.data.data_dir or None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, train_source: sources.Source | None = None,
                       test_source: sources.Source | None = None) -> TrainState:
    """Trains both stages (resuming from `workdir` when it holds checkpoints) and returns the state.

    `train_source` / `test_source` replace loading `config.data.train` / `.test`; the CLP ensemble
    passes its union of datasets this way. A finished run returns at once.
    """
    mesh = parallel.create_mesh()
    config_lib.validate_config(config, num_devices=mesh.devices.size, data_given=train_source is not None)
    path = workdir_lib.as_path(workdir)
    with workdir_lib.locked(path, command="training"):
        return _train(config, path, mesh, train_source, test_source)


def _train(config, path, mesh, train_source, test_source) -> TrainState:
    if jax.process_index() == 0:
        workdir_lib.check_writable(path)
    if train_source is None:
        train_source = _load(config.data.train, config)
    check_training_labels(train_source, config)
    if test_source is None and config.data.test:
        test_source = _load(config.data.test, config)
    if test_source is not None and test_source.num_classes != 0 and test_source.labels.max() >= config.data.num_classes:
        raise errors.ConfigError(f"the test set {test_source.name!r} has labels up to {test_source.labels.max()} but "
                                 f"data.num_classes={config.data.num_classes}; select its classes with '#classes=...'")
    unlabelled = None
    if config.data.unlabelled:
        unlabelled = pipeline.Mixture(_load(config.data.unlabelled, config), config.data.unlabelled_fraction)
    stage1_steps, stage2_steps, warmup_steps = config_lib.stage_steps(config, len(train_source))
    total_steps = stage1_steps + stage2_steps
    host_crops = config.train.augmentation == "simclr" and pipeline.crops_on_host(
        train_source, config.data.image_size, config.data.crop)
    logging.info("training on %s; stage 1: %d steps, stage 2: %d steps, %d devices, crops on the %s",
                 train_source.describe(), stage1_steps, stage2_steps, mesh.devices.size,
                 "host" if host_crops else "device")

    model = models.from_config(config, train_source=train_source)
    schedule = learning_rate_schedule(config, stage1_steps, stage2_steps, warmup_steps)
    tx = create_optimizer(config, schedule)
    checkpoints = checkpointing.Checkpoints(path, keep=config.keep_checkpoints, create=True, config=config)
    existing = checkpoints.steps()
    if existing:
        config_lib.check_resumed_config(config, path)
    state = checkpoints.restore_latest(abstract_train_state(model, tx, config, mesh), move_unreadable=True)
    # Only now: a refused restore (another model) must leave config.json describing the checkpoints.
    config_lib.write_config(config, path)
    if state is None:  # initialise only when there is nothing to resume (init compiles a whole forward pass)
        if existing:
            logging.warning("none of the checkpoints %s in %s could be read (each was moved to %s): training "
                            "starts again from step 0", existing, checkpoints.directory, checkpointing.UNREADABLE_DIR)
        init = jax.jit(functools.partial(create_train_state, model=model, tx=tx, image_size=config.data.image_size),
                       out_shardings=parallel.replicated(mesh))
        state = init(jax.random.key(config.seed))
    start_step = int(state.step)

    writer = summaries.create_writer(path, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(config_lib.hparams(config))

    step_fn = make_train_step(model, tx, config, stage1_steps, schedule, host_crops=host_crops)
    workload = perf.workload(config, mesh.devices.size)
    crop = pipeline.HostCrop(tuple(config.augment.crop_area), tuple(config.augment.crop_aspect)) if host_crops else None
    host_batches = pipeline.train_batches(
        train_source, global_batch_size=config.train.batch_size, seed=config.seed, image_size=config.data.image_size,
        start_step=start_step, sampling=config.train.sampling, host_crop=crop,
        views=2 if config.train.contrastive else 1, unlabelled=unlabelled, workers=config.data.num_workers)
    # The transfer of the next two batches overlaps the current step (asynchronous dispatch).
    batches = pipeline.prefetch(lambda b: parallel.to_global(b, mesh), host_batches, 2, name="to_device")
    progress = summaries.Progress(total_steps, config.log_every_steps)
    pending_metrics = []
    flops_per_step = peak_flops = float("nan")
    first_batch = None
    if start_step < total_steps:
        # Compile once, ahead of the loop, to read XLA's FLOP count of the step for train/mfu.
        first_batch = next(batches)
        long_run = total_steps - start_step >= perf.TUNE_MIN_STEPS
        if long_run and model.conv_impl in ("onednn", "winograd"):  # per layer shape, the kernels faster here
            onednn_conv.choose_layers(lambda: jax.eval_shape(lambda s, b: step_fn(s, b), state, first_batch), mesh)
        measure = perf.tuning_active() and long_run
        options = (tuned_options(step_fn, mesh, state, first_batch, workload, model.conv_impl) if measure
                   else perf.compiler_options(workload, model.conv_impl))
        train_step = jit_train_step(step_fn, mesh, options).lower(state, first_batch).compile()
        flops_per_step = perf.step_flops(train_step)
        peak_flops, _ = perf.log_peak(config.model.dtype, config.train.peak_tflops)
        logging.info("train step: %.3g FLOPs per device (XLA estimate)", flops_per_step)
    else:
        train_step = jit_train_step(step_fn, mesh, perf.compiler_options(workload, model.conv_impl))
    eval_step = jit_eval_step(make_eval_step(model), mesh, perf.compiler_options(workload, model.conv_impl))
    last_log_time, last_log_step = time.time(), start_step
    watcher = preemption.Watcher()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch, first_batch = first_batch or next(batches), None
            # The batch arrived by an explicit transfer; anything implicit here would be a hidden sync.
            with jax.profiler.StepTraceAnnotation("train", step_num=step), jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch)
            pending_metrics.append(metrics)
            progress(step)
            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                summary = _summarise(pending_metrics, step, config)
                pending_metrics = []
                now = time.time()
                steps_per_sec = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                summary["steps_per_sec"] = steps_per_sec
                summary["images_per_sec"] = steps_per_sec * config.train.batch_size
                utilisation = perf.mfu(flops_per_step, steps_per_sec, peak_flops)
                if np.isfinite(utilisation):
                    summary["mfu"] = utilisation
                summary["stage"] = 1 if step <= stage1_steps else 2
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
            stop = watcher.requested(step)
            if step % config.checkpoint_every_steps == 0 or is_last or stop:
                if pending_metrics:  # never checkpoint a state whose steps were not checked (the
                    _summarise(pending_metrics, step, config)  # next log still averages all its steps)
                checkpoints.save(state, force=stop)
            if stop:
                checkpoints.wait()
                raise preemption.Preempted(
                    f"stopped by {watcher.name} at step {step}: checkpoint saved in {path}; run the same command "
                    f"again to resume from step {step}", watcher.signum)
            if test_source is not None and (step % config.eval_every_steps == 0 or is_last):
                accuracy = evaluate_accuracy(eval_step, state, test_source, config, mesh)
                writer.write_scalars(step, {"eval/accuracy": accuracy})
                logging.info("step %d: test accuracy %.4f", step, accuracy)
    finally:
        watcher.close()
        batches.close()
        try:
            checkpoints.wait()
        finally:
            checkpoints.close()
            writer.flush()
    return state


def _summarise(metrics_list: list[dict], step: int, config: ml_collections.ConfigDict) -> dict:
    """Averages step metrics on the host; stops the run at the first step that went non-finite."""
    host = jax.device_get(metrics_list)
    finite = np.array([bool(m["loss_finite"]) and bool(m["state_finite"]) for m in host])
    if not finite.all():
        first = int(np.argmin(finite))
        bad, metrics = step - len(host) + 1 + first, host[first]
        what = ("the loss or gradient" if not metrics["loss_finite"] else
                "the updated parameters or BatchNorm statistics (the loss and gradient were finite)")
        key = config_lib.warmup_key(config)
        advice = (f"lower --config.train.learning_rate (now {config.train.learning_rate:g}) or raise "
                  f"--config.{key} (now {config.train[key.split('.')[1]]:g})")
        if config.model.dtype == "bfloat16":
            advice += ", or use --config.model.dtype=float32"
        raise errors.NonFiniteLossError(
            f"{what} became non-finite at step {bad} (loss={float(metrics['loss']):.4g}); no checkpoint was written "
            f"after the last finite step, so the workdir resumes from the last good one. {advice[0].upper()}{advice[1:]}")
    return {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in ("loss_finite", "state_finite")}

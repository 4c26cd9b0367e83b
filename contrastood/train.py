"""Two-stage training loop of Winkens et al. 2020: SimCLR pre-training, then L_con + lambda * L_class.

Both stages run in one compiled step: the stage is a function of the step counter, so a run resumes
mid-stage from any checkpoint and the device count never changes the program. The step is pure and
jitted at the call site over a ('data',) mesh (see `parallel`).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from clu import metric_writers, periodic_actions

from contrastood import augment, config_lib, losses, models, parallel, perf


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimisation


def learning_rate_schedule(config: ml_collections.ConfigDict, stage1_steps: int, stage2_steps: int,
                           warmup_steps: int) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero, restarted for each stage (paper, Appendix B)."""
    peak = config.train.learning_rate

    def stage(num_steps: int) -> optax.Schedule:
        warmup = min(warmup_steps, max(num_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)

    if stage1_steps == 0:
        return stage(stage2_steps)
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
    return optax.chain(optax.add_decayed_weights(t.weight_decay, _decay_mask),
                       optax.sgd(schedule, momentum=t.momentum))


def create_train_state(key: jax.Array, model: models.ContrastiveResNet, tx: optax.GradientTransformation,
                       image_size: int) -> TrainState:
    variables = model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params))


# ----------------------------------------------------------------------------- steps


def make_train_step(model: models.ContrastiveResNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, stage1_steps: int,
                    schedule: optax.Schedule) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the pure step function (state, global batch) -> (state, metrics)."""
    t = config.train
    contrastive = bool(t.contrastive)
    aug_config = augment.AugmentConfig.from_mapping(config.augment)
    base_key = jax.random.key(config.seed + 1)

    def make_views(key, images):
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
            class_loss, accuracy = losses.smoothed_cross_entropy(outputs["logits"], class_labels, t.label_smoothing)
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
        metrics.update(learning_rate=schedule(state.step), grad_norm=grad_norm,
                       all_finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: models.ContrastiveResNet) -> Callable[[TrainState, dict], dict]:
    """Counts correct predictions on a padded, masked global batch."""

    def eval_step(state: TrainState, batch: dict) -> dict:
        outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              augment.to_float(batch["image"]), train=False)
        mask = batch["mask"].astype(jnp.float32)
        correct = (jnp.argmax(outputs["logits"], -1) == batch["label"]) * mask
        return {"correct": correct.sum(), "count": mask.sum()}

    return eval_step


def jit_train_step(step_fn, mesh) -> Callable:
    """State replicated, batch sharded along 'data'; the old state's buffers are donated."""
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=(repl, repl), donate_argnums=(0,),
                   compiler_options=perf.compiler_options())


def jit_eval_step(step_fn, mesh) -> Callable:
    repl, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(repl, data), out_shardings=repl, compiler_options=perf.compiler_options())


def evaluate_accuracy(eval_step, state: TrainState, dataset, config: ml_collections.ConfigDict, mesh) -> float:
    """Top-1 accuracy over every example of the split exactly once (padding is masked)."""
    from contrastood import input_pipeline  # the pipeline is the only TensorFlow user

    correct = count = 0.0
    for batch in input_pipeline.eval_batches(dataset, global_batch_size=config.eval_batch_size,
                                             image_size=config.data.image_size):
        out = eval_step(state, parallel.to_global({k: batch[k] for k in ("image", "label", "mask")}, mesh))
        correct += float(out["correct"])
        count += float(out["count"])
    return correct / max(count, 1.0)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def abstract_train_state(model, tx, config, mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of a TrainState, without computing anything."""
    shapes = jax.eval_shape(functools.partial(create_train_state, model=model, tx=tx,
                                              image_size=config.data.image_size), jax.random.key(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore_latest(manager: ocp.CheckpointManager, abstract: TrainState) -> TrainState | None:
    """Restores the newest readable checkpoint; a corrupt or partial one falls back to the previous."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # orbax raises many types for truncated or missing files
            logging.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an earlier one",
                            step, type(error).__name__, str(error).splitlines()[0][:200])
            continue
        logging.info("resumed from checkpoint at step %d", step)
        return restored
    return None


# ----------------------------------------------------------------------------- the loop


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json; warns when resuming a workdir that was started with another config."""
    if jax.process_index() > 0:  # process 0 alone reads and writes it: others could read it half-written
        return
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != current:
            changed = sorted(config_changes(previous, current))
            logging.warning("workdir %s was started with a different config; changed keys: %s", workdir, changed)
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def config_changes(previous: dict, current: dict, *, shared_keys_only: bool = False) -> dict[str, tuple]:
    """Dotted key -> (previous, current) for every value that differs between two config dicts.

    With `shared_keys_only`, keys present on one side only (options added to the framework later,
    whose defaults keep the old behaviour) are not changes.
    """
    before, after = _flatten(previous), _flatten(current)
    keys = before.keys() & after.keys() if shared_keys_only else before.keys() | after.keys()
    return {k: (before.get(k), after.get(k)) for k in sorted(keys) if before.get(k) != after.get(k)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hparams(config: ml_collections.ConfigDict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in _flatten(json.loads(config.to_json_best_effort())).items()}


class NonFiniteLossError(FloatingPointError):
    pass


class Preempted(SystemExit):
    """Raised after the checkpoint of a SIGTERM'd run is written; the exit status is 143 (128 + 15)."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message
        logging.warning(message)

    def __str__(self):
        return self.message


class PreemptionWatcher:
    """Turns SIGTERM (the notice Cloud TPU VMs and most schedulers send) into a checkpoint and exit.

    One process: a signal handler sets a flag checked after every step. Several processes: JAX's
    preemption sync point, so that every host saves the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the distributed preemption service is not running
                return False
        return self._flag

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, train_data=None,
                       test_data=None) -> TrainState:
    """Trains both stages (resuming from `workdir` when it holds checkpoints) and returns the state.

    `train_data` / `test_data` (ArrayDatasets) replace loading `config.data.train` / `.test`; the CLP
    ensemble passes its union of datasets this way. A finished run returns at once.
    """
    from contrastood import input_pipeline

    mesh = parallel.create_mesh()
    config_lib.validate_config(config, num_devices=mesh.devices.size)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)

    data_dir = config.data.data_dir or None
    if train_data is None:
        train_data = input_pipeline.load_arrays(config.data.train, image_size=config.data.image_size,
                                                seed=config.seed, data_dir=data_dir)
    _check_labels(train_data, config)
    stage1_steps, stage2_steps, warmup_steps = config_lib.stage_steps(config, len(train_data.labels))
    total_steps = stage1_steps + stage2_steps
    logging.info("training on %s: %d examples, %d classes; stage 1: %d steps, stage 2: %d steps, %d devices",
                 config.data.train, len(train_data.labels), config.data.num_classes, stage1_steps,
                 stage2_steps, mesh.devices.size)

    model = models.create_model(config.model, config.data.num_classes)
    schedule = learning_rate_schedule(config, stage1_steps, stage2_steps, warmup_steps)
    tx = create_optimizer(config, schedule)
    manager = checkpoint_manager(workdir, config)
    state = restore_latest(manager, abstract_train_state(model, tx, config, mesh))
    if state is None:  # initialise only when there is nothing to resume (init compiles a whole forward pass)
        init = jax.jit(functools.partial(create_train_state, model=model, tx=tx, image_size=config.data.image_size),
                       out_shardings=parallel.replicated(mesh))
        state = init(jax.random.key(config.seed))
    start_step = int(state.step)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(_hparams(config))

    train_step = jit_train_step(make_train_step(model, tx, config, stage1_steps, schedule), mesh)
    eval_step = jit_eval_step(make_eval_step(model), mesh)
    if test_data is None and config.data.test:
        test_data = input_pipeline.load_arrays(config.data.test, image_size=config.data.image_size,
                                               seed=config.seed, data_dir=data_dir)
    if test_data is not None:
        _check_labels(test_data, config)

    batches = input_pipeline.train_batches(train_data, global_batch_size=config.train.batch_size,
                                           seed=config.seed, start_step=start_step,
                                           sampling=config.train.sampling)
    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, every_secs=None,
                                                      every_steps=config.log_every_steps)  # logs steps/s, ETA
    pending_metrics = []
    flops_per_step = peak_flops = float("nan")
    first_batch = None
    if start_step < total_steps:
        # Compile once, ahead of the loop, to read XLA's FLOP count of the step for train/mfu.
        first_batch = parallel.to_global(next(batches), mesh)
        train_step = train_step.lower(state, first_batch).compile()
        flops_per_step = perf.step_flops(train_step)
        peak_flops, _ = perf.log_peak(config.model.dtype, config.train.peak_tflops)
        logging.info("train step: %.3g FLOPs per device (XLA estimate)", flops_per_step)
    last_log_time, last_log_step = time.time(), start_step
    preemption = PreemptionWatcher()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch, first_batch = first_batch or parallel.to_global(next(batches), mesh), None
            # The batch arrived by an explicit transfer; anything implicit here would be a hidden sync.
            with jax.profiler.StepTraceAnnotation("train", step_num=step), jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch)
            pending_metrics.append(metrics)
            report_progress(step)
            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                summary = _summarise(pending_metrics, step)
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
            preempted = preemption.requested(step)
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                if pending_metrics:  # never checkpoint a state whose last step was not checked
                    _summarise(pending_metrics[-1:], step)
                manager.save(step, args=ocp.args.StandardSave(state), force=preempted)
            if preempted:
                manager.wait_until_finished()
                raise Preempted(f"preempted (SIGTERM) at step {step}: checkpoint saved in {workdir}; run the "
                                f"same command again to resume from step {step}")
            if test_data is not None and (step % config.eval_every_steps == 0 or is_last):
                accuracy = evaluate_accuracy(eval_step, state, test_data, config, mesh)
                writer.write_scalars(step, {"eval/accuracy": accuracy})
                logging.info("step %d: test accuracy %.4f", step, accuracy)
    finally:
        preemption.close()
        manager.wait_until_finished()
        writer.flush()
    return state


def _summarise(metrics_list: list[dict], step: int) -> dict:
    """Averages step metrics on the host; stops the run on a non-finite loss."""
    host = jax.device_get(metrics_list)
    finite = np.array([m["all_finite"] for m in host])
    if not finite.all():
        bad = step - len(host) + 1 + int(np.argmin(finite))
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {bad} (loss={host[int(np.argmin(finite))]['loss']}); no "
            f"checkpoint was written after it, so the workdir resumes from the last good one. Lower "
            f"--config.train.learning_rate, raise --config.train.warmup_epochs, or use model.dtype=float32.")
    return {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "all_finite"}


def _check_labels(dataset, config: ml_collections.ConfigDict) -> None:
    labels = np.asarray(dataset.labels)
    if labels.size == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    if labels.min() < 0 or labels.max() >= config.data.num_classes:
        raise ValueError(f"dataset {dataset.name!r} has labels in [{labels.min()}, {labels.max()}] but "
                         f"data.num_classes={config.data.num_classes}; set --config.data.num_classes or "
                         f"select classes with '#classes=...' in the spec")

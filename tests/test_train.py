"""The trainer: multi-device equivalence, resume-equals-uninterrupted, checkpoints, summaries, errors."""
import glob
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastood import config_lib, input_pipeline, models, parallel, train


def write_npz(path, n=48, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    # Class-dependent colour so the classifier has something to learn.
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    images = np.clip(base + rng.integers(-20, 20, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def tiny_config(tmp_path, **train_overrides):
    config = config_lib.base_config("cpu")
    config_lib.apply_cpu_variant(config)
    config.data.train = write_npz(tmp_path / "train.npz")
    config.data.test = write_npz(tmp_path / "test.npz", n=20, seed=1)
    config.data.num_classes = 4
    config.model.proj_dim = 8
    config.train.batch_size = 16
    config.train.stage1_steps = 3
    config.train.stage2_steps = 3
    config.train.warmup_steps = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 6
    config.eval_batch_size = 16
    config.ood.sets = {}
    for k, v in train_overrides.items():
        config.train[k] = v
    return config


def leaves_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("contrastive", [True, False])
def test_one_device_equals_eight_devices(tmp_path, contrastive):
    """Same global batch: loss, gradients (via an SGD step) and parameters match 1 vs 8 devices."""
    config = tiny_config(tmp_path, contrastive=contrastive, optimizer="sgd", momentum=0.0, learning_rate=0.01,
                         stage1_steps=1, stage2_steps=2)
    data = input_pipeline.load_arrays(config.data.train)
    batches = input_pipeline.train_batches(data, global_batch_size=16, seed=0)
    batch = next(batches)
    model = models.create_model(config.model, 4)
    stage1, stage2, warmup = config_lib.stage_steps(config, 48)
    schedule = train.learning_rate_schedule(config, stage1, stage2, warmup)
    tx = train.create_optimizer(config, schedule)
    step_fn = train.make_train_step(model, tx, config, stage1, schedule)

    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = parallel.create_mesh(devices)
        state = parallel.replicate(train.create_train_state(jax.random.key(0), model, tx, 32), mesh)
        p0 = jax.device_get(state.params)
        step = train.jit_train_step(step_fn, mesh)
        state, m1 = step(state, parallel.to_global(batch, mesh))
        p1 = jax.device_get(state.params)
        lr0 = float(m1["learning_rate"])
        state, m2 = step(state, parallel.to_global(batch, mesh))
        results.append(dict(m1=jax.device_get(m1), m2=jax.device_get(m2), p1=p1, p2=jax.device_get(state.params),
                            stats=jax.device_get(state.batch_stats),
                            grads=jax.tree.map(lambda a, b: (a - b) / max(lr0, 1e-12), p0, p1)))
    one, eight = results
    for key in ("loss", "class_loss", "grad_norm"):
        np.testing.assert_allclose(one["m1"][key], eight["m1"][key], rtol=1e-5)
        np.testing.assert_allclose(one["m2"][key], eight["m2"][key], rtol=1e-4)
    leaves_close(one["grads"], eight["grads"], rtol=2e-3, atol=1e-5)
    leaves_close(one["p2"], eight["p2"], rtol=1e-4, atol=1e-6)
    leaves_close(one["stats"], eight["stats"], rtol=1e-4, atol=1e-6)


def read_scalars(workdir):
    from tensorboard.backend.event_processing import event_accumulator

    values = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
        acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                value = tf_make_ndarray(event.tensor_proto)
                if value.size == 1:  # scalars; hparams and images are stored differently
                    values.setdefault(tag, []).append((event.step, float(value.reshape(()))))
    return values


def tf_make_ndarray(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted 6-step run (3 contrastive + 3 joint), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("full_run")
    config = tiny_config(tmp_path)
    state = train.train_and_evaluate(config, str(tmp_path / "full"))
    return config, state, tmp_path / "full"


def test_resume_equals_uninterrupted_and_writes_summaries(full_run, tmp_path, monkeypatch):
    config, full, full_workdir = full_run
    assert int(full.step) == 6

    # Preemption: the process dies after step 5 (last checkpoint at step 4), then restarts.
    real_batches = input_pipeline.train_batches

    def dying_batches(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt("simulated preemption")
            yield batch

    monkeypatch.setattr(input_pipeline, "train_batches", dying_batches)
    workdir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, workdir)
    monkeypatch.setattr(input_pipeline, "train_batches", real_batches)
    assert sorted(train.checkpoint_manager(workdir, config).all_steps()) == [2, 4]
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 6
    leaves_close(full.params, resumed.params, rtol=0, atol=0)
    leaves_close(full.batch_stats, resumed.batch_stats, rtol=0, atol=0)

    scalars = read_scalars(str(full_workdir))
    for tag in ("train/contrastive_loss", "train/contrastive_accuracy", "train/class_loss", "train/accuracy",
                "train/learning_rate", "train/steps_per_sec", "train/images_per_sec", "train/mfu",
                "eval/accuracy"):
        assert tag in scalars, f"missing summary {tag}; have {sorted(scalars)}"
    assert [s for s, _ in scalars["train/learning_rate"]] == [2, 4, 6]
    assert all(0 < v < 1.5 for _, v in scalars["train/mfu"]), scalars["train/mfu"]
    assert os.path.exists(full_workdir / "config.json")


def test_corrupt_latest_checkpoint_falls_back(full_run, tmp_path, caplog):
    config, _, full_workdir = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(full_workdir, workdir)
    manager = train.checkpoint_manager(workdir, config)
    assert sorted(manager.all_steps()) == [2, 4, 6]
    # Corrupt every array file of the latest checkpoint, as a crash mid-copy would.
    for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "**", "*"), recursive=True):
        if os.path.isfile(path) and not path.endswith(("_CHECKPOINT_METADATA",)):
            with open(path, "wb") as f:
                f.write(b"garbage")
    model = models.create_model(config.model, 4)
    tx = train.create_optimizer(config, lambda s: 0.1)
    mesh = parallel.create_mesh()
    with caplog.at_level("WARNING"):
        state = train.restore_latest(train.checkpoint_manager(workdir, config),
                                     train.abstract_train_state(model, tx, config, mesh))
    assert int(state.step) == 4
    assert "unreadable" in caplog.text


def test_nonfinite_loss_stops_without_checkpointing(tmp_path):
    config = tiny_config(tmp_path, optimizer="sgd", learning_rate=1e30, stage1_steps=0, stage2_steps=6,
                         contrastive=False)
    config.checkpoint_every_steps = 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss or gradient at step"):
        train.train_and_evaluate(config, workdir)
    steps = train.checkpoint_manager(workdir, config).all_steps()
    manager = train.checkpoint_manager(workdir, config)
    model = models.create_model(config.model, 4)
    tx = train.create_optimizer(config, lambda s: 0.1)
    for step in steps:  # whatever was saved is finite
        restored = manager.restore(step, args=ocp.args.StandardRestore(
            train.abstract_train_state(model, tx, config, parallel.create_mesh())))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_bad_config_fails_before_compiling(tmp_path):
    config = tiny_config(tmp_path)
    config.train.batch_size = 12  # not divisible by 8 devices
    with pytest.raises(ValueError, match="multiple of 8"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))
    config = tiny_config(tmp_path)
    config.model.name = "vgg"
    with pytest.raises(ValueError, match="model.name"):
        config_lib.validate_config(config)
    config = tiny_config(tmp_path)
    config.train.temperature = 0.0
    with pytest.raises(ValueError, match="temperature"):
        config_lib.validate_config(config)
    config = tiny_config(tmp_path)
    config.data.num_classes = 3  # labels go up to 3
    with pytest.raises(ValueError, match="num_classes"):
        train.train_and_evaluate(config, str(tmp_path / "bad2"))


def test_schedule_warms_up_and_restarts_per_stage(tmp_path):
    config = tiny_config(tmp_path, learning_rate=1.0)
    schedule = train.learning_rate_schedule(config, 10, 20, 4)
    lrs = np.array([float(schedule(s)) for s in range(30)])
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1.0)
    assert lrs[9] < 0.1 and lrs[10] == 0.0 and lrs[14] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[14:]) <= 1e-7)


def test_bfloat16_compute_trains_to_a_comparable_loss(tmp_path):
    """Mixed precision (bf16 compute, fp32 params/BN statistics/losses) follows the fp32 run closely."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(tmp_path, stage1_steps=0, stage2_steps=20, contrastive=False, learning_rate=0.2,
                             augmentation="standard")
        config.model.dtype = dtype
        config.log_every_steps = 4
        state = train.train_and_evaluate(config, str(tmp_path / dtype))
        assert jax.tree.leaves(state.params)[0].dtype == np.float32
        losses[dtype] = np.array([v for _, v in read_scalars(str(tmp_path / dtype))["train/class_loss"]])
    fp32, bf16 = losses["float32"], losses["bfloat16"]
    assert fp32[-1] < 0.85 * fp32[0] and bf16[-1] < 0.85 * bf16[0], losses  # both learn
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)  # along the same curve


def test_train_loop_allows_no_implicit_host_to_device_transfer(tmp_path, monkeypatch):
    """A batch that reaches the step as host arrays (a hidden copy every step) is an error, not a slowdown."""
    config = tiny_config(tmp_path, stage1_steps=0, stage2_steps=2)
    real_to_global = parallel.to_global
    calls = []

    def host_batch_after_first(batch, mesh):
        calls.append(1)
        return real_to_global(batch, mesh) if len(calls) == 1 else {k: np.asarray(v) for k, v in batch.items()}

    monkeypatch.setattr(parallel, "to_global", host_batch_after_first)
    with pytest.raises(Exception, match="(?i)transfer"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_config_changes_names_each_differing_dotted_key():
    previous = {"model": {"width": 1, "name": "resnet_tiny"}, "seed": 0, "old_option": True}
    current = {"model": {"width": 2, "name": "resnet_tiny"}, "seed": 0, "new_option": 3}
    assert train.config_changes(previous, current) == {
        "model.width": (1, 2), "new_option": (None, 3), "old_option": (True, None)}
    assert train.config_changes(previous, current, shared_keys_only=True) == {"model.width": (1, 2)}
    assert train.config_changes(current, current) == {}

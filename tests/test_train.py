"""The trainer: multi-device equivalence, resume-equals-uninterrupted, checkpoints, summaries, errors."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contrastood import checkpointing, config_lib, errors, models, parallel, train
from contrastood.data import pipeline, sources


def write_npz(path, n=48, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    # Class-dependent colour so the classifier has something to learn.
    base = (labels[:, None, None, None] * 60 + 20).astype(np.int64)
    images = np.clip(base + rng.integers(-20, 20, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def tiny_config(tmp_path, **train_overrides):
    config = config_lib.base_config()
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
    config.ood.sets = config_lib.ood_sets()
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
    data = sources.load(config.data.train)
    batches = pipeline.train_batches(data, global_batch_size=16, seed=0, image_size=32)
    batch = next(batches)
    batches.close()
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
        # Float rounding of per-device kernels: 1.2e-5 measured on the contrastive loss with oneDNN's
        # convolutions (model.conv=auto on CPU), below 1e-5 with XLA's.
        np.testing.assert_allclose(one["m1"][key], eight["m1"][key], rtol=3e-5)
        # Second step (contrastive, stage 2): the grad norm came out 3.6e-4 apart with oneDNN's kernels on
        # two threads, 7e-6 with OMP_NUM_THREADS=1, and 5e-7 with XLA's kernels. Every oneDNN gradient is
        # within 5e-6 of float64 (tests/test_onednn_conv.py), so this is the step's sensitivity, not a fault.
        np.testing.assert_allclose(one["m2"][key], eight["m2"][key], rtol=1e-3 if key == "grad_norm" else 1e-4)
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


def interrupt_then_resume(config, workdir: str, monkeypatch, die_at: int, check_batch=None, check_call=None):
    """Runs `config` in `workdir` until batch `die_at` raises KeyboardInterrupt (a preemption), then reruns it
    to the end; returns the checkpoint steps left by the interrupted run and the final state."""
    real_batches = pipeline.train_batches

    def dying_batches(*args, **kwargs):
        if check_call:
            check_call(kwargs)
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if check_batch:
                check_batch(batch)
            if i == die_at:
                raise KeyboardInterrupt("simulated preemption")
            yield batch

    monkeypatch.setattr(pipeline, "train_batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, workdir)
    monkeypatch.setattr(pipeline, "train_batches", real_batches)
    left = checkpointing.Checkpoints(workdir).steps()
    return left, train.train_and_evaluate(config, workdir)


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
    left, resumed = interrupt_then_resume(config, str(tmp_path / "resumed"), monkeypatch, die_at=5)
    assert left == [2, 4]
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


def restore(workdir, config):
    model = models.create_model(config.model, config.data.num_classes)
    tx = train.create_optimizer(config, lambda s: 0.1)
    return checkpointing.Checkpoints(workdir).restore_latest(
        train.abstract_train_state(model, tx, config, parallel.create_mesh()), move_unreadable=False)


def corrupt(workdir, step):
    """Overwrites every array file of a checkpoint, as a crash mid-copy would."""
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"), recursive=True):
        if os.path.isfile(path) and not path.endswith(("_CHECKPOINT_METADATA",)):
            with open(path, "wb") as f:
                f.write(b"garbage")


def test_corrupt_latest_checkpoint_falls_back(full_run, tmp_path, caplog):
    config, _, full_workdir = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(full_workdir, workdir)
    assert checkpointing.Checkpoints(workdir).steps() == [2, 4, 6]
    corrupt(workdir, 6)
    with caplog.at_level("WARNING"):
        state = restore(workdir, config)
    assert int(state.step) == 4
    assert "unreadable" in caplog.text


def test_unreadable_newest_checkpoint_is_moved_aside_and_its_step_saved_again(full_run, tmp_path):
    """Was: step 6 retrained on every rerun and never saved (orbax refuses a step <= the newest)."""
    config, full, full_workdir = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(full_workdir, workdir)
    corrupt(workdir, 6)
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 6
    assert checkpointing.Checkpoints(workdir).steps() == [2, 4, 6]
    moved = glob.glob(os.path.join(workdir, checkpointing.UNREADABLE_DIR, "6-*"))
    assert len(moved) == 1 and os.listdir(moved[0])  # renamed, never deleted
    leaves_close(full.params, restore(workdir, config).params, rtol=0, atol=0)  # the retrained step 6 is on disk


@pytest.mark.slow
def test_all_checkpoints_unreadable_restarts_loudly_and_saves(full_run, tmp_path, caplog):
    config, _, full_workdir = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(full_workdir, workdir)
    for step in (2, 4, 6):
        corrupt(workdir, step)
    with caplog.at_level("WARNING"):
        state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 6 and "starts again from step 0" in caplog.text
    assert checkpointing.Checkpoints(workdir).steps() == [2, 4, 6]
    assert len(os.listdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR))) == 3


def test_another_model_in_the_workdir_is_a_mismatch_not_corruption(full_run, tmp_path):
    """Was: a width change was 'unreadable', training restarted from scratch and nothing was saved."""
    config, _, full_workdir = full_run
    workdir = str(tmp_path / "run")
    shutil.copytree(full_workdir, workdir)
    wider = config.copy_and_resolve_references()
    wider.model.width = 2
    with pytest.raises(errors.ConfigError, match=r"model.width: 1 -> 2.*allow_config_change"):
        train.train_and_evaluate(wider, workdir)
    wider.allow_config_change = True
    with pytest.raises(errors.CheckpointMismatchError, match=r"holds another model.*model.width: 1 -> 2"):
        train.train_and_evaluate(wider, workdir)
    # The refused resume left config.json describing the checkpoints (it used to be overwritten first).
    assert json.loads(open(os.path.join(workdir, "config.json")).read())["model"]["width"] == 1
    os.remove(os.path.join(workdir, "config.json"))  # without config.json the shapes still tell
    with pytest.raises(errors.CheckpointMismatchError, match="holds another model.*shape"):
        train.train_and_evaluate(wider, workdir)
    assert checkpointing.Checkpoints(workdir).steps() == [2, 4, 6]
    assert not os.path.exists(os.path.join(workdir, checkpointing.UNREADABLE_DIR))


def test_a_refused_save_raises(full_run, tmp_path):
    config, full, full_workdir = full_run
    checkpoints = checkpointing.Checkpoints(str(full_workdir), config=config)
    with pytest.raises(errors.CheckpointError, match="refused to save step 6"):
        checkpoints.save(full)


def test_checkpoints_of_the_single_item_layout_still_restore(full_run, tmp_path):
    """Workdirs written before the model/opt items hold one 'default' item with the whole TrainState."""
    import orbax.checkpoint as ocp

    config, full, _ = full_run
    workdir = tmp_path / "old"
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(6, args=ocp.args.StandardSave(full))  # the layout of contrastood before checkpointing.py
    manager.wait_until_finished()
    assert os.path.isdir(workdir / "checkpoints" / "6" / "default")
    leaves_close(full.opt_state, restore(str(workdir), config).opt_state, rtol=0, atol=0)
    config_model = config.copy_and_resolve_references()
    _, model_state = checkpointing.restore_model(str(workdir), config_model, parallel.create_mesh())
    assert int(model_state.step) == 6 and not hasattr(model_state, "opt_state")
    leaves_close(full.params, model_state.params, rtol=0, atol=0)


@pytest.mark.slow
def test_nonfinite_loss_stops_without_checkpointing(tmp_path):
    config = tiny_config(tmp_path, optimizer="sgd", learning_rate=1e30, stage1_steps=0, stage2_steps=6,
                         contrastive=False)
    config.checkpoint_every_steps = 1
    workdir = str(tmp_path / "nan")
    with pytest.raises(errors.NonFiniteLossError, match=r"non-finite at step .*--config.train.warmup_steps \(now 1\)"):
        train.train_and_evaluate(config, workdir)
    state = restore(workdir, config)
    # whatever was saved has a finite norm, so a resume at a sane learning rate trains on
    if state is not None:
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
        assert np.isfinite(float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                             for x in jax.tree.leaves(state.params)))))
    config.train.learning_rate = 0.1
    config.allow_config_change = True
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 6


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
    config = tiny_config(tmp_path)
    config.data.num_classes = 6  # classes 4 and 5 have no example: fail before compiling
    with pytest.raises(errors.ConfigError, match=r"classes \[4, 5\] have fewer than 2 training examples"):
        train.train_and_evaluate(config, str(tmp_path / "bad3"))
    config = tiny_config(tmp_path, stage1_steps=-5)
    with pytest.raises(errors.ConfigError, match=r"train.stage1_steps=-5.*-1 to take the count from the epochs"):
        config_lib.validate_config(config)
    config = tiny_config(tmp_path)
    config.ood.sets = config_lib.ood_sets(typo="npz:/x.npz#clases=1")
    with pytest.raises(errors.ConfigError, match="ood.sets.typo.*unknown option 'clases'"):
        config_lib.validate_config(config)
    config = tiny_config(tmp_path)
    config.clp.datasets = ("a=sklearn:digits|sklearn:digits", "b=noize:gaussian|noise:gaussian")
    with pytest.raises(errors.ConfigError, match=r"clp.datasets\[b\].*unknown dataset kind 'noize'"):
        config_lib.validate_config(config)
    config = tiny_config(tmp_path, optimizer="adam")
    with pytest.raises(errors.ConfigError, match="train.optimizer='adam'"):
        config_lib.validate_config(config)


def test_schedule_warms_up_and_restarts_per_stage(tmp_path):
    config = tiny_config(tmp_path, learning_rate=1.0)
    schedule = train.learning_rate_schedule(config, 10, 20, 4)
    lrs = np.array([float(schedule(s)) for s in range(30)])
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1.0)
    assert lrs[9] < 0.1 and lrs[10] == 0.0 and lrs[14] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[14:]) <= 1e-7)
    config.train.schedule = "continuous"  # the other reading of App. B: one warm-up, one cosine
    schedule = train.learning_rate_schedule(config, 10, 20, 4)
    lrs = np.array([float(schedule(s)) for s in range(30)])
    assert lrs[4] == pytest.approx(1.0) and np.all(np.diff(lrs[4:]) <= 1e-7) and lrs[10] > 0.5


@pytest.mark.slow
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
    assert config_lib.config_changes(previous, current) == {
        "model.width": (1, 2), "new_option": (None, 3), "old_option": (True, None)}
    assert config_lib.config_changes(previous, current, shared_keys_only=True) == {"model.width": (1, 2)}
    assert config_lib.config_changes(current, current) == {}


@pytest.mark.slow
def test_resume_on_a_streaming_folder_source_equals_uninterrupted(tmp_path, monkeypatch):
    """Image files read per index, crops cut on the host at 64 px (ImageNet stem): resume at step 3 is exact."""
    from contrastood.configs import folder
    from contrastood.data import synthetic

    synthetic.write_folder(tmp_path / "images", train=24, test=8, ood=8, size=80, classes=2, ood_classes=1)
    config = folder.get_config(f"cpu,path={tmp_path / 'images'}")
    config.data.num_classes = 2
    config.model.proj_dim = 8
    config.train.batch_size = 8
    config.train.stage1_steps = config.train.stage2_steps = 3
    config.train.warmup_steps = 1
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
    config.eval_batch_size = 8
    full = train.train_and_evaluate(config, str(tmp_path / "full"))

    def host_crop_path(kwargs):
        assert kwargs["host_crop"] is not None and kwargs["image_size"] == 64

    left, resumed = interrupt_then_resume(config, str(tmp_path / "resumed"), monkeypatch, die_at=4,
                                          check_call=host_crop_path)
    assert left == [3]
    leaves_close(full.params, resumed.params, rtol=0, atol=0)
    leaves_close(full.batch_stats, resumed.batch_stats, rtol=0, atol=0)


def test_unlabelled_rows_enter_the_contrastive_loss_only(tmp_path):
    """Paper Sec. 6: rows labelled -1 get no class-loss gradient; with every row labelled the masked loss
    is the unmasked one bit for bit (so an empty data.unlabelled changes nothing)."""
    from contrastood import losses

    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(12, 4)), jax.numpy.float32)
    labels = np.array([0, 1, 2, 3, -1, -1, 0, 1, -1, 2, 3, 0], np.int32)

    def class_loss(z, lab, mask):
        return losses.smoothed_cross_entropy(z, np.maximum(lab, 0), 0.1, mask)[0]

    grad = jax.grad(class_loss)(logits, labels, labels >= 0)
    np.testing.assert_array_equal(np.asarray(grad)[labels < 0], 0.0)
    assert np.all(np.abs(np.asarray(grad)[labels >= 0]).sum(axis=1) > 0)
    labelled = np.abs(labels)
    full_mask = np.ones(12, bool)
    assert float(class_loss(logits, labelled, full_mask)) == float(class_loss(logits, labelled, None))
    np.testing.assert_array_equal(jax.grad(class_loss)(logits, labelled, full_mask),
                                  jax.grad(class_loss)(logits, labelled, None))


@pytest.mark.slow
def test_training_with_unlabelled_images_resumes_exactly(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    images = np.random.default_rng(5).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "extra.npz", images=images, labels=np.full(30, -1))
    config.data.unlabelled = f"npz:{tmp_path / 'extra.npz'}"
    config.data.unlabelled_fraction = 0.25
    config.checkpoint_every_steps = 3
    full = train.train_and_evaluate(config, str(tmp_path / "full"))

    def four_of_sixteen_rows_unlabelled(batch):
        assert np.all(batch["label"][12:] == -1) and np.all(batch["label"][:12] >= 0)

    def unlabelled_fraction(kwargs):
        assert kwargs["unlabelled"].fraction == 0.25

    _, resumed = interrupt_then_resume(config, str(tmp_path / "resumed"), monkeypatch, die_at=4,
                                       check_batch=four_of_sixteen_rows_unlabelled, check_call=unlabelled_fraction)
    leaves_close(full.params, resumed.params, rtol=0, atol=0)
    without = tiny_config(tmp_path)  # the unlabelled images change the training
    other = train.train_and_evaluate(without, str(tmp_path / "without"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(other.params)))


@pytest.mark.slow
def test_a_long_run_measures_its_xla_cpu_options_once_and_trains_with_them(tmp_path, monkeypatch):
    """The training loop times every candidate on its own step (8 devices, a copy of the state) before the
    first step, Winograd against the direct kernels for each layer shape Winograd supports, and each strided
    layer's gradient kernels; it caches the winners for this CPU and workload, and the next run reads them
    without measuring."""
    from contrastood import onednn_conv, perf

    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(perf.OPTIONS_ENV, raising=False)
    monkeypatch.delenv(perf.LAYER_TUNING_ENV, raising=False)
    monkeypatch.setattr(perf, "TUNE_MIN_STEPS", 6)  # the tiny run counts as long
    config = tiny_config(tmp_path)
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 6 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    table = json.loads((tmp_path / "cache" / "xla_cpu_options.json").read_text())
    (entry,) = table.values()
    assert entry["workload"] == perf.workload(config, jax.device_count())
    assert set(entry["seconds_per_step"]) == set(perf.CPU_CANDIDATES)
    assert all(s > 0 for s in entry["seconds_per_step"].values())
    if onednn_conv.load() is None:  # model.conv=auto took Winograd where it applies
        # Its one layer Winograd supports (64 channels at 8x8; both views of the global batch) was timed against
        # the direct kernels.
        layers = json.loads((tmp_path / "cache" / onednn_conv.LAYER_TABLE).read_text()).values()
        (layer,) = [entry for entry in layers if "choice" in entry]
        assert (layer["x"], layer["w"], layer["dtype"]) == ([32, 8, 8, 64], [3, 3, 64, 64], "float32")
        assert layer["choice"] in ("winograd", "direct") and set(layer["seconds"]) == {"winograd", "direct"}
        assert all(s > 0 for s in layer["seconds"].values())
        # And its two stride-2 stages' 3x3 and 1x1 convolutions: both data and both weight gradients timed.
        strided = sorted((e["x"], e["w"]) for e in layers if "data" in e)
        assert strided == [([32, 16, 16, 32], [1, 1, 32, 64]), ([32, 16, 16, 32], [3, 3, 32, 64]),
                           ([32, 32, 32, 16], [1, 1, 16, 32]), ([32, 32, 32, 16], [3, 3, 16, 32])]
        for entry in (e for e in layers if "data" in e):
            assert entry["data"] in ("direct", "col2im") and entry["weights"] in ("direct", "im2col")
            assert set(entry["seconds"]) == {"data_direct", "data_col2im", "weights_direct", "weights_im2col"}

    real_choose = perf.choose
    monkeypatch.setattr(perf, "choose", lambda workload, seconds_per_step, conv="xla": real_choose(
        workload, lambda options: pytest.fail("measured again"), conv))
    monkeypatch.setattr(onednn_conv, "_layer_seconds", lambda *args: pytest.fail("layer measured again"))
    monkeypatch.setattr(onednn_conv, "_strided_seconds", lambda *args: pytest.fail("strided layer measured again"))
    again = train.train_and_evaluate(config, str(tmp_path / "again"))
    assert int(again.step) == 6


@pytest.mark.slow
def test_a_logged_loss_averages_every_step_since_the_last_log(tmp_path):
    """Was: the NaN check before a checkpoint dropped the steps it checked from the next logged average."""
    every_step = tiny_config(tmp_path)
    every_step.log_every_steps = 1
    train.train_and_evaluate(every_step, str(tmp_path / "every"))
    per_step = dict(read_scalars(str(tmp_path / "every"))["train/contrastive_loss"])
    sparse = tiny_config(tmp_path)
    sparse.log_every_steps, sparse.checkpoint_every_steps = 3, 2  # a checkpoint at step 2, inside the window
    train.train_and_evaluate(sparse, str(tmp_path / "sparse"))
    logged = dict(read_scalars(str(tmp_path / "sparse"))["train/contrastive_loss"])
    assert sorted(logged) == [3, 6]
    np.testing.assert_allclose(logged[3], np.mean([per_step[s] for s in (1, 2, 3)]), rtol=1e-6)
    np.testing.assert_allclose(logged[6], np.mean([per_step[s] for s in (4, 5, 6)]), rtol=1e-6)

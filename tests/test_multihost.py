"""Two processes on localhost (4 CPU devices each) train and evaluate like one process with 8 devices.

`python -m contrastood.main` runs twice as a 2-process JAX cluster (process 0 configured by flags,
process 1 by CONTRASTOOD_* variables): both stages of the digits smoke config, then the OOD
evaluation. The pytest process (8 forced CPU devices, conftest.py) trains the same config as one
process: same global batch, same 8-device mesh. Checked: the final parameters (read from the orbax
checkpoint the two processes wrote together) match; the features process 0 cached for every
evaluated set, all of sizes that are not multiples of the global eval batch, equal those one
process extracts from the same checkpoint, example by example in dataset order, and so do the OOD
scores; summaries and reports come from process 0 alone. It fails when a process trains on another's
shard of the batch (parameters 2000 times the tolerance apart) or evaluation misplaces examples.
"""
import glob
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from contrastood import checkpointing, distributed, models, parallel, train
from contrastood.configs import digits
from contrastood.data import sources
from contrastood.ood import evaluate, scorers
from contrastood.ood import features as features_lib

pytestmark = pytest.mark.slow  # the fast tier (-m 'not slow') leaves this module out

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 420
# Both stages, 2 steps each, a checkpoint after each stage; SGD at learning rate 0.01 as in
# test_train's 1-vs-8-device test (LARS at the recipe's 0.8 amplifies the last-bit differences of
# cross-process reductions a hundredfold within 4 steps). Global eval batch 24 (3 per device, 12 per
# process): none of the evaluated sets (203 train, 100 test, 50 near-OOD, 64 noise examples) is a
# multiple of it, so the last batch of each is padded.
OVERRIDES = {"train.stage1_steps": 2, "train.stage2_steps": 2, "train.optimizer": "sgd", "train.learning_rate": 0.01,
             "checkpoint_every_steps": 2, "eval_batch_size": 24, "ood.plots": False,
             "clp.run_after_evaluation": False,
             "data.train": "sklearn:digits:train#classes=0-5&limit=203",
             "data.test": "sklearn:digits:test#classes=0-5&limit=100",
             "ood.sets.near_digits_6to9": "sklearn:digits:test#classes=6-9&limit=50"}


def digits_smoke_config():
    config = digits.get_config("smoke")
    for key, value in OVERRIDES.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, process_id, port, log_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTRASTOOD_", "JAX_", "TPU_", "MEGASCALE_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")  # not every interface, as the default would
    cluster = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}",
               f"--process_id={process_id}"]
    if process_id > 0:  # the environment-variable route
        env.update(CONTRASTOOD_COORDINATOR=f"127.0.0.1:{port}", CONTRASTOOD_NUM_PROCESSES=str(NUM_PROCESSES),
                   CONTRASTOOD_PROCESS_ID=str(process_id))
        cluster = []
    cmd = [sys.executable, "-m", "contrastood.main", "--config=configs/digits.py:smoke", f"--workdir={workdir}",
           *cluster, *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def tails(logs, n=4000):
    return "\n".join(f"----- process {i} ({path}) -----\n{pathlib.Path(path).read_text()[-n:]}"
                     for i, path in enumerate(logs))


def wait_all(procs, logs):
    """Waits for every process; the first failure (or the timeout) kills the others."""
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            what = "timed out" if not failed else f"exit codes {[p.returncode for p in procs]}"
            pytest.fail(f"2-process run {what}:\n{tails(logs)}")
        time.sleep(0.5)
    assert all(p.returncode == 0 for p in procs), tails(logs)


def restore(workdir, config, mesh):
    model = models.create_model(config.model, config.data.num_classes)
    tx = train.create_optimizer(config, lambda s: 0.1)
    state = checkpointing.Checkpoints(str(workdir)).restore_latest(train.abstract_train_state(model, tx, config, mesh),
                                                                   move_unreadable=False)
    return model, state


def test_two_processes_train_and_evaluate_like_one(tmp_path):
    assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES, "conftest.py forces 8 CPU devices"
    config = digits_smoke_config()
    total_steps = config.train.stage1_steps + config.train.stage2_steps
    workdir = tmp_path / "two_processes"
    port = free_port()
    logs = [str(tmp_path / f"process_{i}.log") for i in range(NUM_PROCESSES)]
    started = [launch(workdir, i, port, logs[i]) for i in range(NUM_PROCESSES)]
    procs = [p for p, _ in started]
    try:
        # Meanwhile, the reference: one process, the same 8-device mesh and global batch (and no test
        # set: its accuracy does not change the training).
        reference_config = config.copy_and_resolve_references()
        reference_config.data.test = ""
        reference = train.train_and_evaluate(reference_config, str(tmp_path / "one_process"))
        wait_all(procs, logs)
    finally:
        for p, log in started:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    text = [pathlib.Path(path).read_text() for path in logs]
    for i in range(NUM_PROCESSES):
        assert f"JAX process {i}/{NUM_PROCESSES}" in text[i], tails(logs)
        assert f"{NUM_PROCESSES * LOCAL_DEVICES} devices" in text[i], tails(logs)  # the global mesh

    # Training: the checkpoint both processes wrote holds the parameters of the 1-process run.
    mesh = parallel.create_mesh()
    model, state = restore(workdir, config, mesh)
    assert int(state.step) == int(reference.step) == total_steps
    # Measured: at most 1e-7 apart with XLA's convolutions, 1.5e-6 with oneDNN's (model.conv=auto; the
    # cross-process reduction order, amplified over 4 steps); with process 1 training on process 0's shard
    # of each batch, 5e-3 (1000 times the tolerance).
    for name in ("params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(getattr(reference, name)), jax.tree.leaves(getattr(state, name))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-6, err_msg=name)

    # Evaluation: process 0 cached the features of every set, which equal those extracted here.
    load = lambda spec: sources.load(spec, image_size=config.data.image_size, seed=config.seed)  # noqa: E731
    sets = {"train": (config.data.train, True), "test": (config.data.test, False),
            **{name: (spec, False) for name, spec in config.ood.sets.items()}}
    assert len(glob.glob(str(workdir / "features" / f"step_{total_steps}" / "*.npz"))) == len(sets)
    extractor = features_lib.FeatureExtractor(model, state, config, mesh, workdir=None)
    feats = {}
    for name, (spec, fit_only) in sets.items():
        data = load(spec)
        assert len(data) % config.eval_batch_size, f"{name}: make it pad the last global batch"
        path = features_lib._cache_path(workdir, total_steps, data.name,
                                        extractor.cache_key(data, with_network=not fit_only))
        with np.load(path) as cached:
            two = dict(cached)
        one = feats[name] = extractor(data, fit_only=fit_only)
        assert sorted(two) == sorted(one)
        np.testing.assert_array_equal(two["labels"], data.labels)
        for key in one:
            assert two[key].shape[0] == len(data.labels), key
            # Measured: bitwise equal (the same per-device program; no cross-device reduction).
            np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=1e-6, err_msg=f"{name}/{key}")

    # ... and so do the OOD scores in the report process 0 wrote.
    ctx = evaluate.fit_context(config, state, config.data.num_classes)
    fitted, failures = evaluate.fit_scorers(scorers.resolve(config.ood.scorers), feats["train"], ctx)
    assert not failures
    expected = {}
    for name in ("test", *config.ood.sets):
        prefix = "in_distribution" if name == "test" else name
        for scorer, v in evaluate.compute_scores(fitted, feats[name], ctx, failures, name).items():
            expected[f"{prefix}/{scorer}"] = v["scores"]
            if v["classes"] is not None:
                expected[f"{prefix}/{scorer}/classes"] = v["classes"]
        if name != "test":
            expected[f"{name}/labels"] = feats[name]["labels"]
    with np.load(workdir / "ood_scores.npz") as written:
        assert sorted(written) == sorted(expected)
        for key, value in expected.items():
            # RMDS, a difference of two Mahalanobis distances, came out 7.3e-5 apart (1.4e-5 relative) with
            # oneDNN's convolutions (model.conv=auto); within 1e-5 with XLA's.
            np.testing.assert_allclose(written[key], value, rtol=5e-5, atol=1e-4, err_msg=key)

    # Summaries and reports: process 0 alone (its pid is in every event file's name).
    assert (workdir / "config.json").exists() and (workdir / "ood_report.json").exists()
    events = glob.glob(str(workdir / "events.out.tfevents.*"))
    assert events and all(os.path.basename(e).split(".")[-3] == str(procs[0].pid) for e in events), events


@pytest.mark.parametrize("kwargs, environ, expected", [
    ({}, {}, None),  # the single-process default: nothing is initialised
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}, {},
     distributed.Settings("10.0.0.1:1234", 4, 3, "explicit settings")),
    ({"process_id": 1}, {"CONTRASTOOD_COORDINATOR": "h:99", "CONTRASTOOD_NUM_PROCESSES": "2",
                         "CONTRASTOOD_PROCESS_ID": "0"}, distributed.Settings("h:99", 2, 1, "explicit settings")),
    ({"coordinator_address": "h:1", "num_processes": 1, "process_id": 0}, {}, None),  # one process
    ({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"},
     distributed.Settings(None, None, None, "TPU_WORKER_HOSTNAMES lists 4 hosts")),
    ({}, {"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"mode": "on"}, {}, distributed.Settings(None, None, None, "--distributed=on")),
    ({"mode": "off"}, {"CONTRASTOOD_NUM_PROCESSES": "2", "TPU_WORKER_HOSTNAMES": "a,b"}, None),
    ({}, {"CONTRASTOOD_DISTRIBUTED": "off", "MEGASCALE_COORDINATOR_ADDRESS": "a:1"}, None),
])
def test_resolve(kwargs, environ, expected):
    assert distributed.resolve(**kwargs, environ=environ, on_cloud_tpu_vm=False) == expected


def test_resolve_on_cloud_tpu_vm_leaves_everything_to_jax():
    expected = distributed.Settings(None, None, None, "Cloud TPU VM")
    assert distributed.resolve(environ={}, on_cloud_tpu_vm=True) == expected


@pytest.mark.parametrize("kwargs, environ, match", [
    ({"num_processes": 2}, {}, "incomplete: number of processes given but coordinator address and process id missing"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, {}, "is not HOST:PORT"),
    ({"coordinator_address": "h:70000", "num_processes": 2, "process_id": 0}, {}, "is not HOST:PORT"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id=2 is out of range"),
    ({"coordinator_address": "h:1", "process_id": 0}, {"CONTRASTOOD_NUM_PROCESSES": "two"},
     "CONTRASTOOD_NUM_PROCESSES='two' is not an integer"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {}, "must be >= 1"),
    ({"mode": "sometimes"}, {}, "must be one of auto, on, off"),
])
def test_resolve_errors_name_the_fix(kwargs, environ, match):
    with pytest.raises(ValueError, match=match) as error:
        distributed.resolve(**kwargs, environ=environ, on_cloud_tpu_vm=False)
    if "mode" not in kwargs:
        assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in str(error.value)

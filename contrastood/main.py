r"""Entry point: `python -m contrastood.main --config=configs/cifar10.py --workdir=DIR`.

Modes: `train` (both stages, then the OOD evaluation configured in `config.ood`), `evaluate` (OOD
evaluation of the latest checkpoint in the workdir), `clp` (CLP ensemble and analysis).

Several processes (hosts, or one process per GPU): run the same command in each, adding
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the CONTRASTOOD_COORDINATOR,
CONTRASTOOD_NUM_PROCESSES, CONTRASTOOD_PROCESS_ID environment variables); on a Cloud TPU VM slice
this is detected. The workdir must be one directory all processes see. See `contrastood.distributed`.
"""
from __future__ import annotations

import os

# TensorFlow (used only by the input pipeline) must never take GPU/TPU memory from JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from contrastood import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py:cpu.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, features and reports.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "clp"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT where process 0 listens, the "
                    "same in every process (default: $CONTRASTOOD_COORDINATOR).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes "
                     "(default: $CONTRASTOOD_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process, 0..num_processes-1 "
                     "(default: $CONTRASTOOD_PROCESS_ID).")
flags.DEFINE_enum("distributed", None, list(distributed.MODES), "auto (default, $CONTRASTOOD_DISTRIBUTED): call "
                  "jax.distributed.initialize() when the three flags above are set or a multi-worker Cloud TPU is "
                  "detected; on: always (JAX detects what is not given: Cloud TPU, Slurm, Open MPI); off: never.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before anything touches a device: afterwards jax.devices() spans every process.
    try:
        initialised = distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                             FLAGS.process_id)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if jax.process_count() > 1 and not initialised:
        logging.warning("%d JAX processes but jax.distributed is not initialised: checkpoints and preemption "
                        "need it; pass --distributed=on", jax.process_count())
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    config = FLAGS.config
    if FLAGS.mode == "train":
        from contrastood import train
        state = train.train_and_evaluate(config, FLAGS.workdir)
        if config.ood.run_after_training and config.ood.sets:
            from contrastood.ood import evaluate
            evaluate.evaluate(config, FLAGS.workdir, state=state)
        if config.clp.run_after_evaluation and config.clp.datasets:
            from contrastood.ood import clp_runner
            clp_runner.run(config, FLAGS.workdir, detector_state=state)
    elif FLAGS.mode == "evaluate":
        from contrastood.ood import evaluate
        evaluate.evaluate(config, FLAGS.workdir)
    else:
        from contrastood.ood import clp_runner
        clp_runner.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)

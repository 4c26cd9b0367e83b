r"""Entry point: `python -m contrastood.main --config=configs/cifar10.py --workdir=DIR`.

Modes: `train` (both stages, then the OOD evaluation configured in `config.ood`), `evaluate` (OOD
evaluation of the latest checkpoint in the workdir), `clp` (CLP ensemble and analysis).
"""
from __future__ import annotations

import os

# TensorFlow (used only by the input pipeline) must never take GPU/TPU memory from JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging
from ml_collections import config_flags

import jax

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py:cpu.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, features and reports.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "clp"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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

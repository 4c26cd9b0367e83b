r"""Entry point: `python -m contrastood.main --config=configs/cifar10.py --workdir=DIR`.

Modes: `train` (both stages, then the OOD evaluation configured in `config.ood`, then the CLP study if
`clp.run_after_evaluation`), `evaluate` (OOD evaluation of the newest readable checkpoint), `clp` (CLP
ensemble and analysis), `compare` (a baseline workdir against this one: the paper's Table 3 and Figs.
4-6). The workdir may be local or a URL (gs://...); one run at a time holds it.

Mistakes a user can fix (a bad override, a missing file, a locked or full workdir, an unreadable
checkpoint) print one line naming the fix and exit with status 2; `--verbose` adds the traceback.
SIGTERM and Ctrl-C save a checkpoint and exit with 143 and 130.

`--config` is a path (`configs/digits.py:smoke`); a `configs/NAME.py` that does not exist relative to
the current directory is taken from the installed package (`contrastood.configs`). OOD sets are
added or replaced with `--config.ood.sets.NAME=SPEC` and dropped with `--config.ood.sets.NAME=`.

Several processes (hosts, or one process per GPU): run the same command in each, adding
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the CONTRASTOOD_COORDINATOR,
CONTRASTOOD_NUM_PROCESSES, CONTRASTOOD_PROCESS_ID environment variables); on a Cloud TPU VM slice
this is detected. The workdir must be one directory all processes see. See `contrastood.distributed`.
"""
from __future__ import annotations

import errno
import os
import pathlib
import sys

# TensorFlow (used only to decode TFDS sources) must never take GPU/TPU memory from JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from contrastood import distributed, errors  # noqa: E402

MODES = ("train", "evaluate", "clp", "compare")
_SETS_PREFIX = "--config.ood.sets."

def package_configs() -> pathlib.Path:
    """Where the `contrastood.configs` package lives (the repository's configs/ links to it)."""
    return pathlib.Path(__file__).resolve().parent / "configs"


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py:cpu.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, summaries, features and reports.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
flags.DEFINE_string("baseline_workdir", None, "--mode=compare: the evaluated workdir of the baseline model.")
flags.DEFINE_bool("verbose", False, "Show the traceback of errors that are otherwise one line.")
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

_set_overrides: list[tuple[str, str]] = []


def _fail(message: str) -> None:
    """The one-line error, printed last: a failed asynchronous write (orbax on a full disk) leaves asyncio
    tasks whose exceptions asyncio logs when they are collected, which would otherwise come after it."""
    import gc
    import logging as std_logging

    gc.collect()  # log them now, above the line
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)  # and none at interpreter exit
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def resolve_config_path(argv: list[str]) -> list[str]:
    """`--config=configs/NAME.py[:ARG]` from any directory: a missing path is looked up in the package."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            value = arg[len("--config="):]
            path, colon, variant = value.partition(":")
            installed = package_configs() / pathlib.Path(path).name
            if not os.path.exists(path) and installed.exists():
                arg = f"--config={installed}{colon}{variant}"
            elif not os.path.exists(path):
                known = ", ".join(sorted(p.name for p in package_configs().glob("*.py") if p.name != "__init__.py"))
                _fail(f"--config={value}: {path} does not exist (here or in the package's configs: {known})")
        out.append(arg)
    return out


def split_set_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Takes `--config.ood.sets.NAME=SPEC` out of argv: config_flags cannot add keys to a dict."""
    rest, sets = [], []
    for arg in argv:
        if arg.startswith(_SETS_PREFIX) and "=" in arg:
            name, _, spec = arg[len(_SETS_PREFIX):].partition("=")
            if not name or "." in name:
                _fail(f"{arg}: write --config.ood.sets.NAME=SPEC (or NAME= to drop a set)")
            sets.append((name, spec))
        else:
            rest.append(arg)
    return rest, sets


def _innermost_contrastood_error(error: BaseException) -> errors.ContrastoodError | None:
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, errors.ContrastoodError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with one-line errors (bad flags, unknown config keys, config file errors)."""
    argv, sets = split_set_overrides(resolve_config_path(list(argv)))
    _set_overrides.extend(sets)
    sys.argv[:] = argv  # config_flags finds the --config.KEY overrides in sys.argv itself
    try:
        return FLAGS(argv)
    except flags.Error as error:
        cause = _innermost_contrastood_error(error)  # raised in get_config; config_flags wraps it twice
        _fail(str(cause) if cause else str(error).splitlines()[0])
    except errors.ContrastoodError as error:
        _fail(str(error))
    except (AttributeError, KeyError) as error:  # config_flags: an override of a key that does not exist
        text = str(error).strip("'\"").replace("\\n", " ").replace('\\"', '"')
        _fail(f"unknown config key in an override ({text}); check the spelling against the config file "
              f"(--config.ood.sets.NAME=SPEC adds an OOD set)")
    return argv


def _apply_set_overrides(config) -> None:
    for name, spec in _set_overrides:
        if spec:
            config.ood.sets[name] = spec
        elif name in config.ood.sets:
            del config.ood.sets[name]
        else:
            _fail(f"--config.ood.sets.{name}= drops a set, but there is no OOD set {name!r} "
                  f"(sets: {', '.join(config.ood.sets) or 'none'})")


def run(config, mode: str, workdir: str, baseline_workdir: str | None = None) -> None:
    import jax

    from contrastood import workdir as workdir_lib

    if mode == "compare":
        from contrastood.ood import compare

        if not baseline_workdir:
            raise errors.ConfigError("--mode=compare needs --baseline_workdir=DIR (an evaluated baseline workdir)")
        compare.run(baseline_workdir, workdir)
        return
    if mode == "train":
        with workdir_lib.locked(workdir, command="contrastood.main --mode=train"):
            from contrastood import config_lib, train
            from contrastood.ood import evaluate

            state = train.train_and_evaluate(config, workdir)
            evaluated = config.ood.run_after_training and bool(config.ood.sets)
            if evaluated:
                evaluate.evaluate(config, workdir, state=state)
            baseline_dir = f"{str(workdir).rstrip('/')}/baseline"
            if config.compare.baseline and evaluated:  # the paper's baseline, trained and scored alike
                baseline = config_lib.baseline_config(config)
                evaluate.evaluate(baseline, baseline_dir, state=train.train_and_evaluate(baseline, baseline_dir))
            if config.clp.run_after_evaluation and config.clp.datasets:
                from contrastood import clp_study

                clp_study.run(config, workdir, detector_state=state)
            if config.compare.baseline and evaluated and jax.process_index() == 0:  # reads files, writes reports
                from contrastood.ood import compare

                compare.run(baseline_dir, workdir)
    elif mode == "evaluate":
        from contrastood.ood import evaluate

        evaluate.evaluate(config, workdir)
    else:
        from contrastood import clp_study

        clp_study.run(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from contrastood import host_memory

    # Before JAX starts its CPU client, whose threads bind to malloc arenas at their first allocation.
    host_memory.configure(host_decoding=host_memory.decodes_on_host(FLAGS.config))
    import jax

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
    _apply_set_overrides(config)
    try:
        run(config, FLAGS.mode, FLAGS.workdir, FLAGS.baseline_workdir)
    except errors.ContrastoodError as error:
        if FLAGS.verbose:
            raise
        _fail(str(error))
    except OSError as error:  # a full, read-only or unreachable disk or bucket
        if FLAGS.verbose or error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                                errno.ENOENT):
            raise
        from contrastood import workdir as workdir_lib

        where = f" ({error.filename})" if error.filename else ""
        _fail(f"{workdir_lib.describe_os_error(error)}{where}: {workdir_lib.os_error_fix(error)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

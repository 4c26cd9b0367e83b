"""Checkpoints: the train state, the orbax manager, and restoring a model without the trainer.

A checkpoint holds two orbax items, as flax's gemma example does: `model` = {params, batch_stats,
step} and `opt` = {opt_state}. Evaluation and the CLP study restore `model` alone (`restore_model`),
so they never build an optimizer. Workdirs written before this layout (one `default` item holding
the whole TrainState) are still restored.

What restoring guarantees:
  - A checkpoint of another model (shapes or structure differ, e.g. after `--config.model.width=2` on
    a width-1 workdir) is an error that names the changed config keys; it is never taken for corruption.
  - A checkpoint that cannot be read is moved aside (`checkpoints_unreadable/`, renamed, never deleted)
    before training continues from the newest readable one, so the retrained steps can be saved.
  - A save that has to happen (interval, last step, preemption) and is refused raises.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp
from etils import epath

from contrastood import errors, workdir as workdir_lib

MODEL, OPT, LEGACY = "model", "opt", "default"
UNREADABLE_DIR = "checkpoints_unreadable"


class ModelState(flax.struct.PyTreeNode):
    """What evaluation needs: the network's variables at a step."""
    step: jax.Array
    params: Any
    batch_stats: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _model_item(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats, "step": state.step}


def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _shapes(tree) -> dict[str, tuple]:
    """'params/stage1_block1/...' -> (shape, dtype) of every array (or array metadata) in a tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _mismatch(stored: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    problems = []
    for key in sorted(expected.keys() - stored.keys())[:3]:
        problems.append(f"{key} is missing from the checkpoint")
    for key in sorted(stored.keys() - expected.keys())[:3]:
        problems.append(f"{key} is in the checkpoint but not in this model")
    for key in sorted(expected.keys() & stored.keys()):
        if stored[key][0] != expected[key][0]:
            problems.append(f"{key} has shape {stored[key][0]} in the checkpoint, {expected[key][0]} here")
        if len(problems) >= 5:
            break
    return problems


def _config_changes_note(workdir: epath.Path, config) -> str:
    if config is None:
        return ""
    from contrastood import config_lib

    changes = config_lib.changes_against_workdir(config, workdir)
    if not changes:
        return ""
    return " Config changes against its config.json: " + ", ".join(
        f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:8]) + "."


class Checkpoints:
    """The checkpoints of one workdir (`WORKDIR/checkpoints/STEP/{model,opt}`)."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, create: bool = True, config=None):
        self.workdir = workdir_lib.as_path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        if not create and not self.directory.exists():
            self.manager = None
        else:
            # Handlers named up front: a fresh manager can then read the items' metadata before any save.
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                MODEL: ocp.StandardCheckpointHandler(), OPT: ocp.StandardCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def _is_legacy(self, step: int) -> bool:
        return (self.directory / str(step) / LEGACY).exists()

    def _stored_shapes(self, step: int, with_opt: bool) -> dict[str, tuple]:
        if self._is_legacy(step):
            meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / LEGACY)
            tree = dict(getattr(meta, "item_metadata", meta).tree)
            if not with_opt:
                tree.pop("opt_state", None)
            return _shapes(tree)
        meta = self.manager.item_metadata(step)
        shapes = _shapes(meta[MODEL].tree)
        if with_opt:
            shapes.update(_shapes(meta[OPT].tree))
        return shapes

    def _restore(self, step: int, abstract) -> Any:
        """Restores `abstract` (a TrainState or ModelState of ShapeDtypeStructs) from one step."""
        if self._is_legacy(step):
            path = self.directory / str(step) / LEGACY
            if isinstance(abstract, TrainState):
                return ocp.StandardCheckpointer().restore(path, abstract)
            item = _model_item(abstract)  # the model part alone: no optimizer is built to read it
            model = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
            return ModelState(step=model["step"], params=model["params"], batch_stats=model["batch_stats"])
        items = {MODEL: ocp.args.StandardRestore(_model_item(abstract))}
        if isinstance(abstract, TrainState):
            items[OPT] = ocp.args.StandardRestore({"opt_state": abstract.opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        model = restored[MODEL]
        if isinstance(abstract, TrainState):
            return TrainState(step=model["step"], params=model["params"], batch_stats=model["batch_stats"],
                              opt_state=restored[OPT]["opt_state"])
        return ModelState(step=model["step"], params=model["params"], batch_stats=model["batch_stats"])

    def _check_shapes(self, step: int, abstract) -> None:
        """Raises CheckpointMismatchError if step holds another model; other failures propagate."""
        with_opt = isinstance(abstract, TrainState)
        expected = _shapes(_model_item(abstract))
        if with_opt:
            expected.update(_shapes({"opt_state": abstract.opt_state}))
        stored = self._stored_shapes(step, with_opt)
        if not with_opt:
            stored = {k: v for k, v in stored.items() if not k.startswith("opt_state")}
        problems = _mismatch(stored, expected)
        if problems:
            raise errors.CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} holds another model: {'; '.join(problems)}."
                f"{_config_changes_note(self.workdir, self.config)} Run with the config that trained it, or give "
                "this run another --workdir")

    def restore_latest(self, abstract, *, move_unreadable: bool) -> Any | None:
        """The newest readable step restored into `abstract`'s structure, or None if there is none.

        move_unreadable=True (training): an unreadable step is moved aside before falling back, so the
        steps retrained after it can be saved again. False (evaluation): it is skipped with a warning.
        """
        for step in reversed(self.steps()):
            try:
                self._check_shapes(step, abstract)
                state = self._restore(step, abstract)
            except errors.CheckpointMismatchError:
                raise
            except Exception as error:  # orbax raises many types for truncated or missing files
                reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
                if move_unreadable:
                    moved = self.move_aside(step)
                    logging.warning("checkpoint at step %d is unreadable (%s); moved it to %s and falling back to an "
                                    "earlier one", step, reason, moved)
                else:
                    logging.warning("checkpoint at step %d is unreadable (%s); using an earlier one", step, reason)
                continue
            logging.info("restored the checkpoint at step %d of %s", step, self.directory)
            return state
        return None

    def move_aside(self, step: int) -> epath.Path:
        """Renames an unreadable step out of the manager's view (never deletes it)."""
        target = self.workdir / UNREADABLE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            workdir_lib.move_tree(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"contrastood-move-aside-{step}")
        self.manager.reload()
        return target

    def save(self, state: TrainState, *, force: bool = False) -> None:
        """Saves both items at state.step; CheckpointError when orbax refuses a save that had to happen.

        Saves are asynchronous: a write that fails (a full disk) is reported by the next save or wait.
        """
        step = int(state.step)
        with self._storage_errors(step):
            saved = self.manager.save(step, args=ocp.args.Composite(
                **{MODEL: ocp.args.StandardSave(_model_item(state)),
                   OPT: ocp.args.StandardSave({"opt_state": state.opt_state})}), force=force)
        if not saved:
            latest = self.manager.latest_step()
            raise errors.CheckpointError(
                f"orbax refused to save step {step} in {self.directory} (newest existing step: {latest}); the "
                f"checkpoints there belong to a run that went further. Move {self.directory} aside or give this "
                "run another --workdir")

    def wait(self) -> None:
        if self.manager is not None:
            with self._storage_errors(None):
                self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None):
        """orbax reports a full disk (or quota) as a ValueError from tensorstore: make it the user's error."""
        try:
            yield
        except (ValueError, OSError) as error:
            text = str(error)
            if not any(m in text for m in ("No space left", "RESOURCE_EXHAUSTED", "Disk quota", "os_error_code='28'")):
                raise
            kept = [s for s in self.steps() if step is None or s < step]
            with contextlib.suppress(Exception):  # let orbax's writer threads end before the process exits
                self.manager.close()
            self.manager = None  # closed: close() has nothing left to do
            raise errors.WorkdirError(
                f"No space left on device while saving a checkpoint in {self.directory}: free space on that disk "
                f"(or point --workdir elsewhere) and run the same command again; the finished checkpoints "
                f"{kept} are kept") from None

    def close(self) -> None:
        """Ends orbax's checkpointer threads and metadata stores (pending saves finish first)."""
        if self.manager is not None:
            self.manager.close()
            self.manager = None

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_model_state(model, image_size: int, mesh) -> ModelState:
    """Shapes, dtypes and replicated shardings of a ModelState, without computing anything."""
    import jax.numpy as jnp

    from contrastood import parallel

    def init(key):
        variables = model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)
        return ModelState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"])

    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(init, jax.random.key(0)))


def restore_model(workdir: str | os.PathLike, config, mesh, *, model=None):
    """(model, ModelState) of the newest readable checkpoint in `workdir`, restored without an optimizer.

    `model` defaults to the one the config describes (models.from_config, which needs data.mean/std).

    Raises CheckpointError naming the fix when the workdir has no (readable) checkpoint, and
    CheckpointMismatchError when its checkpoints hold another model than `config` describes.
    """
    from contrastood import models

    path = workdir_lib.as_path(workdir)
    if not path.exists():
        raise errors.CheckpointError(f"the workdir {path} does not exist; check --workdir, or train first "
                                     "(--mode=train)")
    model = model if model is not None else models.from_config(config)
    with Checkpoints(path, keep=config.keep_checkpoints, create=False, config=config) as checkpoints:
        steps = checkpoints.steps()
        if not steps:
            raise errors.CheckpointError(f"no checkpoint in {path / 'checkpoints'}; train first (--mode=train) or "
                                         "point --workdir at a trained run")
        abstract = abstract_model_state(model, config.data.image_size, mesh)
        state = checkpoints.restore_latest(abstract, move_unreadable=False)
    if state is None:
        raise errors.CheckpointError(f"every checkpoint in {path / 'checkpoints'} (steps {steps}) is unreadable; "
                                     "retrain, or restore a backup of that directory")
    return model, state


r"""Downloads and prepares, once, every TFDS dataset a contrastood config names, into one data_dir.

  python3 launch/prepare_tfds.py --config=configs/cifar10.py --data_dir=gs://BUCKET/tensorflow_datasets
  python3 launch/prepare_tfds.py --config=configs/clp_cifar10.py --list        # names only, no download
  python3 launch/prepare_tfds.py --datasets=cifar10,svhn_cropped --data_dir=gs://BUCKET/tensorflow_datasets

The names come from every `tfds:NAME[:VERSION]:SPLIT` spec in the config (data.train, data.test,
ood.sets, clp.datasets, ... after `--config.KEY=VALUE` overrides), so the training command and this
one see the same datasets. The data_dir is resolved as the input pipeline resolves it:
`config.data.data_dir` if set, else --data_dir, else $TFDS_DATA_DIR. Datasets already prepared there
are skipped by TFDS. Downloads go to --download_dir (local disk), not to the bucket. Datasets are
written as ArrayRecord (--file_format), which contrastood reads at random, one record per example and
step, without holding the split in memory; a TFRecord-prepared set is read whole into memory instead.

`launch/tpu_vm.sh prepare-data` runs this on TPU worker 0 (or, with --local, on this machine).
Note: `places365_small` (the paper's Places365 OOD set) downloads and prepares all its splits,
including the 1.8 M-image train split (tens of GB); expect it to dominate the time.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

from absl import app, flags
from ml_collections import config_flags

# The configs import contrastood.config_lib: make the checkout importable even where it is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "contrastood config file, e.g. configs/cifar10.py.",
                                lock_config=False)
flags.DEFINE_list("datasets", [], "TFDS names to prepare; default: every tfds: spec in --config.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (gs://BUCKET/tensorflow_datasets).")
flags.DEFINE_string("download_dir", os.path.expanduser("~/tensorflow_datasets/downloads"),
                    "Where raw downloads go (local disk).")
flags.DEFINE_bool("list", False, "Only print the dataset names, one per line; download nothing.")
flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"],
                  "array_record: random access (streamed by contrastood.data); tfrecord: TFDS's old default.")

# The name part of a tfds spec as the input pipeline parses it: NAME or NAME:X.Y.Z, then :SPLIT.
_TFDS_SPEC = re.compile(r"(?:^|[|=\s])tfds:(?P<name>[^:#|\s]+(?::\d+\.\d+\.\d+)?):")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def tfds_names(config) -> list[str]:
    """Every TFDS dataset name (with its version, if pinned) in a config, in first-seen order."""
    names: list[str] = []
    for text in _strings(config.to_dict()):
        for match in _TFDS_SPEC.finditer(text):
            if match["name"] not in names:
                names.append(match["name"])
    return names


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.datasets:
        names = list(FLAGS.datasets)
    elif config is not None:
        names = tfds_names(config)
    else:
        raise app.UsageError("give --config (to prepare every tfds: set it names) or --datasets")
    if FLAGS.list:
        print("\n".join(names))
        return
    if not names:
        print("prepare_tfds: the config names no tfds: dataset; nothing to prepare")
        return
    config_dir = (config.data.get("data_dir", "") if config is not None else "") or None
    data_dir = config_dir or FLAGS.data_dir or os.environ.get("TFDS_DATA_DIR")
    if not data_dir:
        raise app.UsageError("no data_dir: give --data_dir=gs://BUCKET/tensorflow_datasets or set "
                             "$TFDS_DATA_DIR (or config.data.data_dir)")
    if config_dir and FLAGS.data_dir and config_dir != FLAGS.data_dir:
        print(f"prepare_tfds: config.data.data_dir={config_dir} overrides --data_dir={FLAGS.data_dir}, "
              "as it does in training")

    import tensorflow_datasets as tfds  # only now: --list must work without TensorFlow

    for i, name in enumerate(names, 1):
        print(f"prepare_tfds: [{i}/{len(names)}] {name} -> {data_dir}", flush=True)
        builder = tfds.builder(name, data_dir=data_dir, file_format=FLAGS.file_format)
        builder.download_and_prepare(download_dir=FLAGS.download_dir)
        splits = ", ".join(f"{split}: {info.num_examples}" for split, info in builder.info.splits.items())
        print(f"prepare_tfds: {name} ready ({splits})", flush=True)
    print(f"prepare_tfds: all {len(names)} datasets ready in {data_dir}")


if __name__ == "__main__":
    sys.exit(app.run(main))

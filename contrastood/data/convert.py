r"""Converts .npz datasets to memory-mappable .npy files (the `npy:PREFIX` spec).

  python -m contrastood.data.convert IN.npz [IN2.npz ...] PREFIX

writes PREFIX.images.npy, PREFIX.labels.npy and PREFIX.label_names.json; training then reads only the
rows each batch needs instead of holding the whole split in memory. Several inputs are concatenated.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from contrastood import workdir
from contrastood.data import sources, specs


def convert(inputs: list[str], prefix: str) -> sources.ArraySource:
    source = sources.load_npz(specs.parse_spec("npz:" + "+".join(inputs)))
    images_path, labels_path, names_path = sources.npy_paths(prefix)
    images_path.parent.mkdir(parents=True, exist_ok=True)
    for path, array in ((images_path, source.array), (labels_path, source.labels)):
        with path.open("wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    workdir.atomic_write_text(names_path, json.dumps(list(source.class_names)))
    return source


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source = convert(argv[1:-1], argv[-1])
    print(f"wrote {argv[-1]}.images.npy ({source.array.shape}), .labels.npy, .label_names.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

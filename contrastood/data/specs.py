"""Dataset spec strings: one string names any dataset, so configs and `--config.` overrides stay simple.

  tfds:NAME[:VERSION]:SPLIT   a prepared TFDS dataset, e.g. `tfds:cifar10:train`, `tfds:svhn_cropped:test`,
                              `tfds:cifar10:train[:90%]` (data.data_dir or $TFDS_DATA_DIR; needs TensorFlow).
  npz:PATH[+PATH...]          .npz files with `images` (uint8 N,H,W,3 or N,H,W) and `labels` (-1 =
                              unlabelled), optional `label_names`; several files are concatenated. Read
                              into host memory: for small sets (CIFAR is 150 MB).
  npy:PREFIX                  PREFIX.images.npy (uint8 N,H,W,3), PREFIX.labels.npy and optionally
                              PREFIX.label_names.json, memory-mapped: only the rows a batch needs are read.
                              `python -m contrastood.data.convert IN.npz PREFIX` writes them.
  folder:PATH[:SPLIT]         PATH[/SPLIT]/<class>/<image> (png, jpg, jpeg, bmp, webp, gif, tif); classes
                              sorted by name; images decoded per index, at their own size.
  noise:gaussian[:N]          N (default 10000) images of per-pixel clip(N(0.5, 0.25^2), 0, 1) at the
  noise:uniform[:N]           configured size; image i depends only on (seed, i). Unlabelled.
  sklearn:digits[:SPLIT]      scikit-learn's 8x8 digits, SPLIT in {train, test, all} (default all): a fixed
                              stratified 75/25 split (seed 0).
  sklearn:photos[:N]          N (default 2000) square patches of scikit-learn's two sample photographs at
                              their own size; unlabelled. Real photos with no download.

Options follow `#`, joined with `&`, and apply in this order (as index views, never copies):
  fraction=A:B      keep positions [round(A*N), round(B*N)) of a fixed permutation of the source
                    (seed `fraction_seed`, default 0), so `#fraction=0:0.8` and `#fraction=0.8:1` are
                    disjoint and together cover the set. Kept examples stay in source order.
  classes=0,1,5 | 0-5 | 0-2,7   keep only these labels, relabelled to 0..k-1 in the listed order (a
                    model trained on `#classes=0-5` needs labels 0..5, and a near-OOD set
                    `#classes=6-9` is then a 4-class set); `relabel=0` keeps the original labels.
  limit=N           keep the first N examples.
Example: `npz:/data/cifar10-test.npz#classes=6-9&limit=500`.

This module is pure Python: parsing a spec reads nothing, so every spec of a config is checked
before anything is loaded or compiled.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Mapping, NamedTuple

from contrastood import errors

KINDS = ("tfds", "npz", "npy", "folder", "noise", "sklearn")
OPTIONS = ("classes", "relabel", "fraction", "fraction_seed", "limit")
NOISE_KINDS = ("gaussian", "uniform")
SKLEARN_NAMES = ("digits", "photos")
DIGITS_SPLITS = ("train", "test", "all")
DEFAULT_NOISE_EXAMPLES = 10_000
DEFAULT_PHOTO_PATCHES = 2_000
_EXAMPLES = ("'tfds:cifar10:test', 'npz:/data/cifar10-test.npz#classes=6-9', 'npy:/data/train', "
             "'folder:/data/textures:test', 'noise:gaussian:10000', 'sklearn:digits:test'")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec string.

    Attributes:
      kind: one of KINDS.
      name: TFDS name (with `:VERSION` if given), '+'-joined npz paths, npy prefix, folder path, noise
        kind ('gaussian'/'uniform') or sklearn set ('digits'/'photos').
      split: the field after the name: a TFDS/folder/digits split, or the example count N for `noise`
        and `sklearn:photos`; None when omitted.
      options: the typed options after `#`.
      raw: the spec string as given (stripped of surrounding whitespace).
    """
    kind: str
    name: str
    split: str | None
    options: "Options" = dataclasses.field(hash=False)
    raw: str

    @property
    def count(self) -> int | None:
        """N of `noise:KIND:N` and `sklearn:photos:N`."""
        return int(self.split) if self.split is not None and self.kind in ("noise", "sklearn") else None


class Options(NamedTuple):
    """The typed options of a spec."""
    classes: tuple[int, ...] | None = None
    relabel: bool = False
    fraction: tuple[float, float] | None = None
    fraction_seed: int = 0
    limit: int | None = None


def spec_error(spec: str, problem: str) -> errors.DataError:
    return errors.DataError(f"bad dataset spec {spec!r}: {problem}. Examples of valid specs: {_EXAMPLES}")


def _positive_int(text: str, what: str, spec: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise spec_error(spec, f"{what} must be a positive integer, got {text!r}")
    return int(text)


def parse_classes(text: str, *, what: str = "classes") -> tuple[int, ...]:
    """'0,1,5' / '0-5' / '0-2,7' -> class ids in the listed order (ranges inclusive).

    The one parser of class lists (spec options, `clp.in_classes`); raises DataError naming `what`.
    """
    classes: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        if match := re.fullmatch(r"(\d+)-(\d+)", item):
            first, last = int(match[1]), int(match[2])
            if first > last:
                raise errors.DataError(f"{what}: range {item!r} is empty; write it as low-high, e.g. 0-5")
            classes.extend(range(first, last + 1))
        elif re.fullmatch(r"\d+", item):
            classes.append(int(item))
        else:
            raise errors.DataError(f"{what} must be comma-separated ids or inclusive ranges like '0,1,2' or "
                                   f"'0-5', got {text!r}")
    if len(set(classes)) != len(classes):
        raise errors.DataError(f"{what} {text!r} lists a class twice")
    return tuple(classes)


def _raw_options(option_text: str, spec: str) -> dict[str, str]:
    options = {}
    for item in option_text.split("&"):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise spec_error(spec, f"option {item!r} is not key=value (options look like '#classes=0-5&limit=100')")
        if key not in OPTIONS:
            raise spec_error(spec, f"unknown option {key!r}; valid options: {', '.join(OPTIONS)}")
        if key in options:
            raise spec_error(spec, f"option {key!r} given twice")
        options[key] = value
    return options


def _typed_options(options: Mapping[str, str], spec: str) -> Options:
    classes = None
    if "classes" in options:
        try:
            classes = parse_classes(options["classes"])
        except errors.DataError as error:
            raise spec_error(spec, str(error)) from None
    relabel = classes is not None
    if "relabel" in options:
        if classes is None:
            raise spec_error(spec, "relabel only applies together with classes=")
        if options["relabel"] not in ("0", "1"):
            raise spec_error(spec, f"relabel must be 0 or 1, got {options['relabel']!r}")
        relabel = options["relabel"] == "1"
    fraction = None
    if "fraction" in options:
        try:
            low, high = (float(p) for p in options["fraction"].split(":"))
        except ValueError:
            low, high = math.nan, math.nan
        if not 0.0 <= low < high <= 1.0:
            raise spec_error(spec, f"fraction must be A:B with 0 <= A < B <= 1 (e.g. 0:0.8), got {options['fraction']!r}")
        fraction = (low, high)
    fraction_seed = 0
    if "fraction_seed" in options:
        if fraction is None:
            raise spec_error(spec, "fraction_seed only applies together with fraction=")
        if not re.fullmatch(r"\d+", options["fraction_seed"]):
            raise spec_error(spec, f"fraction_seed must be a non-negative integer, got {options['fraction_seed']!r}")
        fraction_seed = int(options["fraction_seed"])
    limit = _positive_int(options["limit"], "limit", spec) if "limit" in options else None
    return Options(classes, relabel, fraction, fraction_seed, limit)


def parse_spec(spec: str) -> DatasetSpec:
    """Parses a dataset spec string (see the module docstring); DataError on anything malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise spec_error(str(spec), "expected a non-empty string")
    raw = spec.strip()
    body, has_options, option_text = raw.partition("#")
    options = _typed_options(_raw_options(option_text, raw) if has_options else {}, raw)
    kind, sep, rest = body.partition(":")
    if kind not in KINDS:
        raise spec_error(raw, f"unknown dataset kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not sep or not rest:
        raise spec_error(raw, f"nothing follows '{kind}:'")

    split: str | None = None
    if kind == "tfds":
        # The split may itself contain ':' (train[:90%]); an optional x.y.z version belongs to the name.
        match = re.fullmatch(r"(?P<name>[^:]+(?::\d+\.\d+\.\d+)?):(?P<split>.+)", rest)
        if not match:
            raise spec_error(raw, "TFDS specs need a split: 'tfds:NAME:SPLIT', e.g. 'tfds:cifar10:test'")
        name, split = match["name"], match["split"]
    elif kind == "npz":
        name = rest
        if any(not path for path in name.split("+")):
            raise spec_error(raw, "empty path in 'npz:PATH+PATH'")
    elif kind == "npy":
        name = rest
    elif kind == "folder":
        # Only a last ':' field without '/' is a split, so 'gs://bucket/dir' stays a path.
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail:
            name, split = head, tail
        else:
            name = rest
    else:  # noise, sklearn
        name, _, split_text = rest.partition(":")
        split = split_text or None
        if kind == "noise":
            if name not in NOISE_KINDS:
                raise spec_error(raw, f"unknown noise {name!r}; valid: {', '.join(NOISE_KINDS)}")
            if split is not None:
                _positive_int(split, "the number of noise images", raw)
        else:
            if name not in SKLEARN_NAMES:
                raise spec_error(raw, f"unknown sklearn set {name!r}; valid: {', '.join(SKLEARN_NAMES)}")
            if name == "digits" and split is not None and split not in DIGITS_SPLITS:
                raise spec_error(raw, f"sklearn:digits split must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")
            if name == "photos" and split is not None:
                _positive_int(split, "the number of photo patches", raw)
    if not name:
        raise spec_error(raw, "empty dataset name")
    return DatasetSpec(kind=kind, name=name, split=split, options=options, raw=raw)

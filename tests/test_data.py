"""contrastood.data: specs, random-access sources and views, host-sliced batches, eval padding, on
tiny generated data, image folders, sklearn sources, mocked TFDS and the real CIFAR-10 test file."""
import collections
import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image

from contrastood import errors
from contrastood.data import images as images_lib
from contrastood.data import pipeline, sources, specs

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------- helpers


def indexed_images(n: int, size: int = 2, offset: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] whose first pixel encodes the example index (see decode_index)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    index = np.arange(offset, offset + n)
    images[..., 0] = (index % 256)[:, None, None]
    images[..., 1] = (index // 256)[:, None, None]
    images[..., 2] = 7
    return images


def decode_index(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def write_npz(path: pathlib.Path, images, labels, label_names=None) -> str:
    arrays = {"images": images, "labels": labels}
    if label_names is not None:
        arrays["label_names"] = np.asarray(label_names)
    np.savez(path, **arrays)
    return str(path)


def labelled_dataset(n: int, num_classes: int = 10, size: int = 2) -> sources.ArraySource:
    return sources.ArraySource(indexed_images(n, size), np.arange(n) % num_classes,
                               [f"c{i}" for i in range(num_classes)], "test")


def load(spec: str, image_size: int = 32, **kwargs) -> tuple[sources.Source, np.ndarray]:
    """A source and all of its images at image_size (what the evaluation pipeline feeds the model)."""
    source = sources.load(spec, image_size=image_size, **kwargs)
    return source, source.fetch(np.arange(len(source)), image_size)


def batches(source, n, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, "image_size": 2, **kwargs}
    return take(pipeline.train_batches(source, **kwargs), n)


def take(iterator, n: int) -> list:
    items = list(itertools.islice(iterator, n))
    iterator.close()  # Stops the prefetch thread.
    return items


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture
def labelled_npz(tmp_path):
    """50 indexed 4x4 examples, label = index % 10, CIFAR-10 class names."""
    return write_npz(tmp_path / "labelled.npz", indexed_images(50, 4), np.arange(50) % 10, CIFAR10_NAMES)


# ------------------------------------------------------------------------------------------ spec parsing


def test_parse_spec_fields_and_options():
    spec = specs.parse_spec(" tfds:cifar10:3.0.2:train[:90%]#classes=0-5&limit=10 ")
    assert (spec.kind, spec.name, spec.split) == ("tfds", "cifar10:3.0.2", "train[:90%]")
    assert spec.options == specs.Options(classes=(0, 1, 2, 3, 4, 5), relabel=True, limit=10)
    assert spec.raw == "tfds:cifar10:3.0.2:train[:90%]#classes=0-5&limit=10"
    assert specs.parse_spec("tfds:svhn_cropped:test").name == "svhn_cropped"

    spec = specs.parse_spec("npz:/a/part1.npz+/a/part2.npz")
    assert (spec.kind, spec.name, spec.split, spec.options) == ("npz", "/a/part1.npz+/a/part2.npz", None,
                                                                specs.Options())
    assert (specs.parse_spec("folder:/data/dtd:test").name, specs.parse_spec("folder:/data/dtd:test").split) == (
        "/data/dtd", "test")
    assert (specs.parse_spec("folder:/data/dtd").name, specs.parse_spec("folder:/data/dtd").split) == ("/data/dtd", None)
    assert specs.parse_spec("folder:gs://bucket/dtd").name == "gs://bucket/dtd"
    assert specs.parse_spec("npy:gs://bucket/train").name == "gs://bucket/train"
    assert (specs.parse_spec("noise:gaussian").name, specs.parse_spec("noise:gaussian").split) == ("gaussian", None)
    assert specs.parse_spec("noise:uniform:500").count == 500
    assert specs.parse_spec("sklearn:digits:test").split == "test"
    spec = specs.parse_spec("npz:x.npz#fraction=0:0.8&fraction_seed=3&classes=6,7&relabel=0")
    assert spec.options == specs.Options(classes=(6, 7), relabel=False, fraction=(0.0, 0.8), fraction_seed=3)
    assert spec == specs.parse_spec("npz:x.npz#fraction=0:0.8&fraction_seed=3&classes=6,7&relabel=0")
    hash(spec)  # Usable as a dict key.


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty"),
    ("imagenet:train", "valid kinds: tfds, npz, npy, folder, noise, sklearn"),
    ("npz:x.npz#shuffle=1", "valid options: classes, relabel, fraction, fraction_seed, limit"),
    ("npz:x.npz#limit", "key=value"),
    ("npz:x.npz#limit=1&limit=2", "twice"),
    ("npz:x.npz#limit=0", "positive integer"),
    ("npz:x.npz#classes=5-2", "empty"),
    ("npz:x.npz#classes=1,1", "twice"),
    ("npz:x.npz#classes=a", "comma-separated"),
    ("npz:x.npz#relabel=1", "together with classes"),
    ("npz:x.npz#classes=1&relabel=yes", "0 or 1"),
    ("npz:x.npz#fraction=0.8:0.2", "0 <= A < B <= 1"),
    ("npz:x.npz#fraction=half", "0 <= A < B <= 1"),
    ("npz:x.npz#fraction_seed=1", "together with fraction"),
    ("npz:a.npz+", "empty path"),
    ("tfds:cifar10", "need a split"),
    ("noise:pink", "valid: gaussian, uniform"),
    ("noise:gaussian:many", "positive integer"),
    ("sklearn:iris", "valid: digits, photos"),
    ("sklearn:digits:val", "train, test, all"),
    ("sklearn:photos:0", "positive integer"),
])
def test_parse_spec_errors_name_the_fix(spec, message):
    with pytest.raises(errors.DataError, match=message) as error:
        specs.parse_spec(spec)
    assert "Examples of valid specs" in str(error.value)


def test_parse_classes_is_the_one_class_list_parser():
    assert specs.parse_classes("0-2,7") == (0, 1, 2, 7)
    with pytest.raises(errors.DataError, match="clp.in_classes"):
        specs.parse_classes("0-x", what="clp.in_classes")


# -------------------------------------------------------------------------------------------- npz / npy


def test_npz_files_are_concatenated(tmp_path):
    part1 = write_npz(tmp_path / "p1.npz", indexed_images(6, 8), np.arange(6) % 3, ["a", "b", "c"])
    part2 = write_npz(tmp_path / "p2.npz", indexed_images(4, 8, offset=6), np.array([2, 2, 1, 0]))
    source, images = load(f"npz:{part1}+{part2}", image_size=8)
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8 and source.image_shape == (8, 8)
    np.testing.assert_array_equal(decode_index(images), np.arange(10))
    np.testing.assert_array_equal(source.labels, [0, 1, 2, 0, 1, 2, 2, 2, 1, 0])
    assert source.labels.dtype == np.int32
    assert (source.class_names, source.num_classes, source.name) == (["a", "b", "c"], 3, f"npz:{part1}+{part2}")
    assert source[3]["label"] == 0 and decode_index(source[3]["image"][None])[0] == 3


def test_resize_matches_pil_bilinear_and_grayscale_becomes_rgb(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    source, images = load(f"npz:{write_npz(tmp_path / 'big.npz', big, np.full(2, -1))}", image_size=32)
    golden = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)) for x in big])
    np.testing.assert_array_equal(images, golden)  # Antialiased bilinear (Pillow's support grows when shrinking).
    assert (source.num_classes, source.class_names, source.image_shape) == (0, [], (64, 64))

    gray = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    source, images = load(f"npz:{write_npz(tmp_path / 'gray.npz', gray, np.zeros(3, int))}", image_size=16)
    for channel in range(3):
        np.testing.assert_array_equal(images[..., channel], gray)
    assert (source.class_names, source.num_classes) == (["0"], 1)


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (1, 32, 64, 3), dtype=np.uint8)  # Already 32 high: only the crop.
    _, images = load(f"npz:{write_npz(tmp_path / 'wide.npz', wide, [-1])}", image_size=32)
    np.testing.assert_array_equal(images[0], wide[0, :, 16:48])


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": np.zeros(2, int)}, "uint8"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.zeros(2, int)}, r"\[N, H, W, 3\]"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "missing keys"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, int)}, "shape"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0.0, 1.0])}, "integers"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, -1])}, "mix -1"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([-3, -3])}, "labels must lie"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, 2]), "label_names": np.array(["a", "b"])},
     "labels must lie"),
])
def test_bad_npz_contents_raise(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(errors.DataError, match=message):
        sources.load(f"npz:{path}", image_size=4)


def test_missing_and_mismatched_npz_files_raise(tmp_path, labelled_npz):
    with pytest.raises(errors.DataError, match="does not exist"):
        sources.load(f"npz:{tmp_path / 'nope.npz'}")
    other = write_npz(tmp_path / "other.npz", indexed_images(2, 4), [0, 1], ["x", "y"])
    with pytest.raises(errors.DataError, match="disagree on label_names"):
        sources.load(f"npz:{labelled_npz}+{other}", image_size=4)
    with pytest.raises(errors.DataError, match="image_size"):
        sources.load(f"npz:{labelled_npz}", image_size=0)
    with pytest.raises(errors.DataError, match="selects no examples"):
        sources.load(f"npz:{write_npz(tmp_path / 'two.npz', indexed_images(2, 4), [0, 0], ['a', 'b'])}#classes=1",
                     image_size=4)


def test_npy_is_memory_mapped_and_equals_the_npz(tmp_path, labelled_npz):
    from contrastood.data import convert

    convert.main(["convert", labelled_npz, str(tmp_path / "conv")])
    npz_source, npz_images = load(f"npz:{labelled_npz}#classes=6-9", image_size=4)
    npy_source, npy_images = load(f"npy:{tmp_path / 'conv'}#classes=6-9", image_size=4)
    assert isinstance(npy_source.base.array, np.memmap)  # the view is over the memory map
    np.testing.assert_array_equal(npy_images, npz_images)
    np.testing.assert_array_equal(npy_source.labels, npz_source.labels)
    assert npy_source.class_names == npz_source.class_names == CIFAR10_NAMES[6:]
    with pytest.raises(errors.DataError, match="PREFIX.images.npy"):
        sources.load(f"npy:{tmp_path / 'missing'}")


def test_fingerprint_changes_with_the_content_not_the_path(tmp_path):
    """The feature cache's data key: a file overwritten at the same path is another dataset."""
    path = tmp_path / "data.npz"
    write_npz(path, indexed_images(8, 4), np.arange(8) % 2)
    first = sources.load(f"npz:{path}", image_size=4).fingerprint()
    assert sources.load(f"npz:{path}", image_size=4).fingerprint() == first
    write_npz(path, indexed_images(8, 4, offset=100), np.arange(8) % 2)
    assert sources.load(f"npz:{path}", image_size=4).fingerprint() != first
    assert sources.load(f"npz:{path}#limit=4", image_size=4).fingerprint() != \
        sources.load(f"npz:{path}", image_size=4).fingerprint()
    assert sources.load("noise:gaussian:8", seed=0).fingerprint() != sources.load("noise:gaussian:8", seed=1).fingerprint()


# ------------------------------------------------------------------------------------------- folders


def make_folder(root: pathlib.Path, split: str, layout: dict[str, list[np.ndarray]], ext: str = ".png"):
    for class_name, images in layout.items():
        (root / split / class_name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / split / class_name / f"{i:04d}{ext}")


def test_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ant_gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    ant_wide = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "ant").mkdir(parents=True)
    Image.fromarray(cat[0]).save(tmp_path / "train" / "cat" / "0.png")
    Image.fromarray(cat[1]).save(tmp_path / "train" / "cat" / "1.BMP")
    Image.fromarray(ant_gray).save(tmp_path / "train" / "ant" / "a.png")
    Image.fromarray(ant_wide).save(tmp_path / "train" / "ant" / "b.webp", lossless=True)
    Image.fromarray(cat[0]).save(tmp_path / "train" / "ant" / "c.jpg", quality=95)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    Image.fromarray(cat[1]).save(tmp_path / "test" / "cat" / "0.png")
    Image.fromarray(ant_gray).save(tmp_path / "test" / "ant" / "0.png")

    source, images = load(f"folder:{tmp_path}:train", image_size=32)
    assert source.class_names == ["ant", "cat"] and source.num_classes == 2  # Alphabetical, not creation order.
    assert source.image_shape is None  # decoded per index, each at its own size
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1])
    assert images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(images[0], np.repeat(ant_gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(source.image(1), ant_wide)  # the original size, webp lossless
    pil = np.asarray(Image.fromarray(ant_wide).resize((43, 32), Image.BILINEAR))[:, 5:37]
    np.testing.assert_array_equal(images[1], pil)
    decoded_by_pil = np.asarray(Image.open(tmp_path / "train" / "ant" / "c.jpg").convert("RGB"))
    np.testing.assert_array_equal(images[2], decoded_by_pil)  # Accurate IDCT, as Pillow.
    np.testing.assert_array_equal(images[3:], cat)  # PNG and BMP are lossless.

    no_split, images = load(f"folder:{tmp_path / 'test'}", image_size=32)
    np.testing.assert_array_equal(images[1], cat[1])
    assert no_split.class_names == ["ant", "cat"] and no_split.labels.tolist() == [0, 1]

    with pytest.raises(errors.DataError, match="PATH/SPLIT/<class>"):
        sources.load(f"folder:{tmp_path}:val")


def test_folder_errors_name_the_file_or_folder(tmp_path, caplog):
    image = np.zeros((8, 8, 3), np.uint8)
    make_folder(tmp_path, "a", {"x": [image], "y": [image]})
    (tmp_path / "a" / "y" / "readme.md").write_text("text")
    with caplog.at_level("WARNING"):
        source = sources.load(f"folder:{tmp_path}:a", image_size=8)
    assert "skipped 1 files" in caplog.text and "readme.md" in caplog.text
    (tmp_path / "a" / "y" / "0001.jpg").write_bytes(b"this is not a jpeg")
    source = sources.load(f"folder:{tmp_path}:a", image_size=8)
    with pytest.raises(errors.DataError, match=r"0001\.jpg"):
        source.fetch(np.arange(len(source)), 8)
    (tmp_path / "a" / "empty").mkdir()
    with pytest.raises(errors.DataError, match=r"class folder .*empty has no images.*shift"):
        sources.load(f"folder:{tmp_path}:a", image_size=8)


# ------------------------------------------------------------------------------------ generated sources


def _clipped_normal_std(mean: float, std: float) -> float:
    density = scipy.stats.norm(mean, std).pdf
    first = scipy.integrate.quad(lambda x: x * density(x), 0, 1)[0] + scipy.stats.norm(mean, std).sf(1)
    second = scipy.integrate.quad(lambda x: x * x * density(x), 0, 1)[0] + scipy.stats.norm(mean, std).sf(1)
    return float(np.sqrt(second - first**2))


def test_noise_is_deterministic_per_index_and_has_the_right_statistics():
    _, small = load("noise:gaussian:10", seed=3)
    large_source, large = load("noise:gaussian:40", seed=3)
    np.testing.assert_array_equal(small, large[:10])
    assert not np.array_equal(small, load("noise:gaussian:10", seed=4)[1])
    assert not np.array_equal(large[0], large[1])
    assert (large_source.num_classes, large_source.class_names, set(large_source.labels.tolist())) == (0, [], {-1})

    gaussian = load("noise:gaussian:100")[1] / 255.0
    assert gaussian.shape == (100, 32, 32, 3)
    assert gaussian.mean() == pytest.approx(0.5, abs=2e-3)
    assert gaussian.std() == pytest.approx(_clipped_normal_std(0.5, 0.25), abs=2e-3)  # ~0.2399
    # Clipping puts P(N(0.5, 0.25) > 1) = P(Z > 2) of the mass on each end.
    assert np.mean(gaussian == 1.0) == pytest.approx(scipy.stats.norm.sf(2.0), abs=2e-3)
    assert np.mean(gaussian == 0.0) == pytest.approx(scipy.stats.norm.sf(2.0), abs=2e-3)

    uniform = load("noise:uniform:100", image_size=16)[1] / 255.0
    assert uniform.shape == (100, 16, 16, 3)
    assert uniform.mean() == pytest.approx(0.5, abs=3e-3)
    assert uniform.std() == pytest.approx(np.sqrt(1 / 12), abs=3e-3)


def test_sklearn_digits_split_is_stratified_disjoint_and_covering():
    digits = sklearn.datasets.load_digits()
    full, full_images = load("sklearn:digits", image_size=8)
    np.testing.assert_array_equal(full_images[..., 0], np.round(digits.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(full.labels, digits.target)
    assert full.class_names == [str(i) for i in range(10)] and full.image_shape == (8, 8)

    train, train_images = load("sklearn:digits:train", image_size=8)
    test, test_images = load("sklearn:digits:test", image_size=8)
    assert (len(train), len(test)) == (1347, 450)
    as_bytes = lambda images, source: collections.Counter(zip(map(bytes, images), source.labels.tolist()))  # noqa: E731
    assert as_bytes(train_images, train) + as_bytes(test_images, test) == as_bytes(full_images, full)  # A partition.
    per_class = np.bincount(digits.target)
    assert np.all(np.abs(np.bincount(test.labels) - 0.25 * per_class) <= 1)

    big_source, big = load("sklearn:digits:test", image_size=32)
    assert big.shape == (450, 32, 32, 3)
    np.testing.assert_array_equal(big[..., 0], big[..., 2])
    np.testing.assert_array_equal(big_source.labels, test.labels)


def test_sklearn_photos_are_deterministic_real_patches():
    few_source, few = load("sklearn:photos:4", image_size=24)
    more_source, more = load("sklearn:photos:9", image_size=24)
    assert more.shape == (9, 24, 24, 3) and more_source.num_classes == 0
    np.testing.assert_array_equal(few, more[:4])
    assert not np.array_equal(few, load("sklearn:photos:4", image_size=24, seed=1)[1])
    assert more.reshape(9, -1).std(axis=1).min() > 1  # Photo content, not flat fill.
    assert min(more_source.image(i).shape[0] for i in range(9)) >= 24  # patches at their own size


# -------------------------------------------------------------------------------------------- options


def test_classes_option_selects_and_relabels(labelled_npz):
    near_ood, images = load(f"npz:{labelled_npz}#classes=6-9", image_size=4)
    index = decode_index(images)
    np.testing.assert_array_equal(index, [i for i in range(50) if i % 10 >= 6])
    np.testing.assert_array_equal(near_ood.labels, index % 10 - 6)
    assert (near_ood.num_classes, near_ood.class_names) == (4, CIFAR10_NAMES[6:])
    assert isinstance(near_ood, sources.View)  # an index view, not a copy

    listed_order, images = load(f"npz:{labelled_npz}#classes=3,1", image_size=4)
    np.testing.assert_array_equal(listed_order.labels, np.where(decode_index(images) % 10 == 3, 0, 1))
    assert listed_order.class_names == ["cat", "automobile"]

    kept, images = load(f"npz:{labelled_npz}#classes=3,1&relabel=0", image_size=4)
    np.testing.assert_array_equal(kept.labels, decode_index(images) % 10)
    assert (kept.num_classes, kept.class_names) == (10, CIFAR10_NAMES)

    with pytest.raises(errors.DataError, match=r"do not exist; valid ids are 0\.\.9"):
        sources.load(f"npz:{labelled_npz}#classes=8-10", image_size=4)
    with pytest.raises(errors.DataError, match="needs a labelled dataset"):
        sources.load("noise:uniform:5#classes=0")


def test_fraction_splits_are_disjoint_covering_and_seeded(labelled_npz):
    index_of = lambda options: decode_index(load(f"npz:{labelled_npz}#{options}", image_size=4)[1])  # noqa: E731
    head, tail = index_of("fraction=0:0.8"), index_of("fraction=0.8:1")
    assert (len(head), len(tail)) == (40, 10)
    assert np.all(np.diff(head) > 0)  # Source order kept.
    assert set(head).isdisjoint(tail) and set(head) | set(tail) == set(range(50))
    assert not np.array_equal(head, np.arange(40))  # A permutation, not a prefix.
    np.testing.assert_array_equal(head, index_of("fraction=0:0.8&fraction_seed=0"))
    other = index_of("fraction=0:0.8&fraction_seed=1")
    assert len(other) == 40 and set(other) != set(head)
    # fraction is applied before classes, so class filters partition the same split.
    class_one = index_of("fraction=0:0.5&classes=1")
    assert set(class_one) == {i for i in index_of("fraction=0:0.5") if i % 10 == 1}
    np.testing.assert_array_equal(index_of("limit=7"), np.arange(7))
    np.testing.assert_array_equal(index_of("classes=2&limit=3"), [2, 12, 22])
    np.testing.assert_array_equal(index_of("limit=500"), np.arange(50))


def test_union_offsets_labels_and_makes_unlabelled_sets_one_class(tmp_path):
    three = write_npz(tmp_path / "three.npz", indexed_images(6, 8), [2, 1, 0, 0, 1, 2], ["x", "y", "z"])
    names = ["sklearn:digits:test", "noise:uniform:20", f"npz:{three}"]
    union = sources.load_union(names, image_size=8)
    assert union.layout == [
        sources.UnionPart(names[0], 0, 10, [str(i) for i in range(10)]),
        sources.UnionPart(names[1], 10, 1, [names[1]]),
        sources.UnionPart(names[2], 11, 3, ["x", "y", "z"]),
    ]
    assert union.num_classes == 14 and len(union.class_names) == 14 and len(union) == 450 + 20 + 6
    digits, digit_images = load(names[0], image_size=8)
    images = union.fetch(np.arange(len(union)), 8)
    np.testing.assert_array_equal(union.labels[:450], digits.labels)
    np.testing.assert_array_equal(images[:450], digit_images)
    np.testing.assert_array_equal(images[470:], indexed_images(6, 8))
    np.testing.assert_array_equal(union.labels[450:470], np.full(20, 10))
    np.testing.assert_array_equal(union.labels[470:], np.array([2, 1, 0, 0, 1, 2]) + 11)
    shuffled = np.random.default_rng(0).permutation(len(union))
    np.testing.assert_array_equal(union.fetch(shuffled, 8), images[shuffled])  # parts interleaved in one batch
    with pytest.raises(errors.DataError, match="non-empty list"):
        sources.load_union("noise:uniform:5")


# ------------------------------------------------------------------------------------------- TFDS (mocked)


def tiny_tfds_image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_source_reads_a_prepared_dataset(tmp_path, file_format, caplog):
    """A real TFDS dataset prepared here: 12 train / 5 test images of mixed sizes, 3 classes."""
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                           "label": tfds.features.ClassLabel(names=["a", "b", "c"])})
    split = lambda n: [(i, {"image": tiny_tfds_image(i), "label": i % 3}) for i in range(n)]  # noqa: E731
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_images_for_tests", version="1.0.0", features=features, data_dir=str(tmp_path),
        split_datasets={"train": split(12), "test": split(5)}, file_format=file_format, disable_shuffling=True)
    with caplog.at_level("WARNING"):
        source, images = load("tfds:tiny_images_for_tests:train", image_size=16, data_dir=str(tmp_path))
    assert ("reading its encoded images into memory" in caplog.text) == (file_format == "tfrecord")
    assert source.class_names == ["a", "b", "c"] and source.image_shape is None
    np.testing.assert_array_equal(source.labels, np.arange(12) % 3)
    for i in (0, 7, 11):  # random access, decoded from the stored PNG: the original pixels
        np.testing.assert_array_equal(source.image(i), tiny_tfds_image(i))
    np.testing.assert_array_equal(images[7], images_lib.resize_square(tiny_tfds_image(7), 16))
    test, _ = load("tfds:tiny_images_for_tests:test#classes=1,2", image_size=16, data_dir=str(tmp_path))
    np.testing.assert_array_equal(test.labels, [0, 1, 0])
    with pytest.raises(errors.DataError, match="no split 'val'"):
        sources.load("tfds:tiny_images_for_tests:val", data_dir=str(tmp_path))
    with pytest.raises(errors.DataError, match="unknown TFDS dataset 'cifr10'.*did you mean cifar10"):
        sources.load("tfds:cifr10:train")


def test_unprepared_tfds_dataset_fails_in_seconds_and_leaves_nothing(tmp_path):
    data_dir = tmp_path / "tensorflow_datasets"
    with pytest.raises(errors.DataError, match=r"not prepared.*prepare_tfds.py.*data.data_dir.*npz"):
        sources.load("tfds:cifar10:train", data_dir=str(data_dir))
    assert not data_dir.exists()


# ------------------------------------------------------------------------------------------ train_batches


def test_train_batches_are_deterministic_and_resume_exactly():
    source = labelled_dataset(10)
    stream = batches(source, 12)
    assert stream[0]["image"].shape == (4, 2, 2, 3) and stream[0]["image"].dtype == np.uint8
    assert stream[0]["label"].shape == (4,) and stream[0]["label"].dtype == np.int32
    for batch in stream:  # Labels travel with their images.
        np.testing.assert_array_equal(batch["label"], decode_index(batch["image"]) % 10)
    assert_batches_equal(stream, batches(source, 12, buffer_size=0))
    assert_batches_equal(stream[5:], batches(source, 7, start_step=5))
    other_seed = batches(source, 12, seed=1)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(stream, other_seed))


def test_epoch_sampling_sees_every_example_once_per_epoch():
    stream = batches(labelled_dataset(10), 10)
    index = np.concatenate([decode_index(b["image"]) for b in stream]).reshape(4, 10)  # 40 = 4 epochs.
    for epoch in index:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
    assert len({tuple(epoch) for epoch in index}) > 1  # Reshuffled each epoch.


def test_index_shuffle_is_a_keyed_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        out = pipeline.index_shuffle(np.arange(n), n, key=12345)
        np.testing.assert_array_equal(np.sort(out), np.arange(n))
    a = pipeline.index_shuffle(np.arange(1000), 1000, key=1)
    assert not np.array_equal(a, np.arange(1000)) and not np.array_equal(a, pipeline.index_shuffle(np.arange(1000), 1000, key=2))
    # Beyond a stored permutation's size, epochs use it: each epoch still sees every example once.
    epoch = pipeline.epoch_indices(pipeline.STORED_PERMUTATION_MAX + 3, seed=0)
    n = pipeline.STORED_PERMUTATION_MAX + 3
    sample = np.arange(0, n, 997, dtype=np.int64)
    first, second = epoch(sample), epoch(sample + n)
    assert len(np.unique(first)) == len(sample) and not np.array_equal(first, second)


@pytest.mark.parametrize("sampling", ["epoch", "uniform_class"])
def test_two_processes_split_the_global_batch(sampling):
    source = labelled_dataset(13, num_classes=3)
    kwargs = dict(global_batch_size=6, seed=2, sampling=sampling)
    global_stream = batches(source, 5, **kwargs)
    host0 = batches(source, 5, process_index=0, process_count=2, **kwargs)
    host1 = batches(source, 5, process_index=1, process_count=2, **kwargs)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(host0, host1)]
    assert host0[0]["image"].shape[0] == 3
    assert_batches_equal(global_stream, joined)


def test_uniform_class_sampling_balances_an_imbalanced_set():
    labels = np.repeat([0, 1, 2], [60, 6, 1])
    source = sources.ArraySource(indexed_images(67), labels, ["big", "small", "tiny"], "imbalanced")
    stream = batches(source, 100, global_batch_size=30, sampling="uniform_class")
    drawn = np.concatenate([b["label"] for b in stream])
    index = np.concatenate([decode_index(b["image"]) for b in stream])
    np.testing.assert_array_equal(labels[index], drawn)
    counts = np.bincount(drawn, minlength=3)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts
    assert len(np.unique(index[drawn == 0])) > 50  # Uniform within a class too.
    epoch = batches(source, 100, global_batch_size=30)
    assert np.bincount(np.concatenate([b["label"] for b in epoch]))[0] > 0.85 * 3000  # Contrast: 60/67.


def test_unlabelled_mixture_fills_its_share_of_every_batch():
    labelled = labelled_dataset(10)
    unlabelled = sources.ArraySource(indexed_images(7, offset=500), np.full(7, -1), [], "extra")
    mixture = pipeline.Mixture(unlabelled, 0.25)
    stream = batches(labelled, 6, global_batch_size=8, unlabelled=mixture)
    for batch in stream:
        np.testing.assert_array_equal(batch["label"][6:], [-1, -1])
        assert np.all(decode_index(batch["image"][6:]) >= 500) and np.all(decode_index(batch["image"][:6]) < 10)
        np.testing.assert_array_equal(batch["label"][:6], decode_index(batch["image"][:6]) % 10)
    assert_batches_equal(stream[3:], batches(labelled, 3, global_batch_size=8, unlabelled=mixture, start_step=3))
    without = batches(labelled, 6, global_batch_size=6)
    for a, b in zip(stream, without):  # the labelled part is the same stream as a 6-example batch
        np.testing.assert_array_equal(a["image"][:6], b["image"])


def test_train_batches_errors():
    source = labelled_dataset(10)
    with pytest.raises(errors.ConfigError, match="multiple of the 4 processes"):
        batches(source, 1, global_batch_size=6, process_count=4)
    with pytest.raises(errors.ConfigError, match="epoch.*uniform_class"):
        batches(source, 1, sampling="balanced")
    unlabelled = sources.ArraySource(indexed_images(4), np.full(4, -1), [], "noise")
    with pytest.raises(errors.ConfigError, match="needs labels"):
        batches(unlabelled, 1, global_batch_size=2, sampling="uniform_class")
    with pytest.raises(ValueError, match="process_index"):
        batches(source, 1, process_index=2, process_count=2)
    with pytest.raises(errors.DataError, match="uint8"):
        sources.ArraySource(np.zeros((2, 2, 2, 3), np.float32), np.zeros(2, int), ["a"], "floats")


def test_prefetch_thread_reraises_producer_errors():
    def produce(step):
        if step == 3:
            raise RuntimeError("boom at 3")
        return step

    stream = pipeline.prefetch(produce, itertools.count(), buffer_size=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="boom at 3"):
        next(stream)


def test_host_crops_are_cut_from_the_original_image(tmp_path):
    """Streaming folder source: crops from the full-size original, two views per example, resumable."""
    rng = np.random.default_rng(0)
    # Each image is a smooth gradient plus its index in the red channel's high bits, 96x128 px.
    layout = {}
    for c in range(2):
        layout[f"class{c}"] = [np.clip(rng.integers(0, 40, (96, 128, 3)) + 80 * c, 0, 255).astype(np.uint8)
                               for _ in range(5)]
    make_folder(tmp_path, "train", layout)
    source = sources.load(f"folder:{tmp_path}:train", image_size=16)
    assert pipeline.crops_on_host(source, 16) and not pipeline.crops_on_host(labelled_dataset(4, size=16), 16)
    crop = pipeline.HostCrop((0.08, 1.0), (3 / 4, 4 / 3))
    kwargs = dict(global_batch_size=4, image_size=16, host_crop=crop, views=2, workers=2)
    stream = batches(source, 6, **kwargs)
    assert stream[0]["image"].shape == (4, 2, 16, 16, 3)
    assert any(not np.array_equal(b["image"][:, 0], b["image"][:, 1]) for b in stream)  # two different views
    assert_batches_equal(stream[2:], batches(source, 4, start_step=2, **kwargs))  # resume at step k
    assert_batches_equal(stream, batches(source, 6, buffer_size=0, **{**kwargs, "workers": 1}))  # any worker count
    # The view equals Pillow's resampling of the crop box of the full-resolution original.
    step, position, view = 1, 2, 0
    index = pipeline.global_batch_indices(source, global_batch_size=4, seed=0, sampling="epoch")(step)[position]
    rng_view = np.random.default_rng([0, step, position, view, 0x5EED])
    expected = images_lib.random_resized_crop(source.image(int(index)), rng_view, 16, crop.area, crop.aspect)
    np.testing.assert_array_equal(stream[step]["image"][position, view], expected)
    top, left, h, w = images_lib.crop_box(np.random.default_rng([0, step, position, view, 0x5EED]), 96, 128,
                                          crop.area, crop.aspect)
    assert 0.08 * 96 * 128 * 0.7 <= h * w <= 96 * 128


def test_crop_box_distribution_matches_the_device_sampler():
    """Host and device crops come from the same distribution (area and aspect ranges, fallback)."""
    import jax

    from contrastood import augment

    rng = np.random.default_rng(0)
    host = np.array([images_lib.crop_box(rng, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)])
    uniforms = jax.random.uniform(jax.random.key(0), (4000, augment._CROP_UNIFORMS))
    device = np.asarray(jax.vmap(lambda u: augment._sample_crop_box(u, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)))(uniforms))
    for column in (2, 3):  # crop height and width
        assert scipy.stats.ks_2samp(host[:, column], device[:, column]).pvalue > 1e-3


# ------------------------------------------------------------------------------------------- eval_batches


def eval_stream(source, batch, **kwargs):
    kwargs = {"process_index": 0, "process_count": 1, "image_size": 2, **kwargs}
    return pipeline.eval_batches(source, global_batch_size=batch, **kwargs)


def test_eval_batches_pad_and_mask_the_last_batch():
    source = labelled_dataset(10)
    stream = eval_stream(source, 4)
    assert (stream.num_examples, stream.num_batches, len(stream)) == (10, 3, 3)
    all_batches = list(stream)
    assert len(all_batches) == 3
    assert [b["mask"].sum() for b in all_batches] == [4, 4, 2]
    last = all_batches[-1]
    np.testing.assert_array_equal(last["index"], [8, 9, -1, -1])
    np.testing.assert_array_equal(last["label"][2:], [-1, -1])
    assert not last["image"][2:].any()
    index = np.concatenate([b["index"][b["mask"]] for b in all_batches])
    np.testing.assert_array_equal(index, np.arange(10))
    for b in all_batches:
        np.testing.assert_array_equal(decode_index(b["image"][b["mask"]]), b["index"][b["mask"]])
        np.testing.assert_array_equal(b["label"][b["mask"]], source.labels[b["index"][b["mask"]]])
        assert b["index"].dtype == np.int32 and b["mask"].dtype == bool and b["label"].dtype == np.int32
    assert_batches_equal(all_batches, list(stream))  # Re-iterable.


def test_eval_batches_across_two_processes():
    source = labelled_dataset(9)
    single = list(eval_stream(source, 4))
    hosts = [list(eval_stream(source, 4, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == len(single) == 3  # Same count on every host.
    assert hosts[0][0]["image"].shape == (2, 2, 2, 3)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*hosts)]
    assert_batches_equal(single, joined)
    seen = np.concatenate([b["index"][b["mask"]] for host in hosts for b in host])
    np.testing.assert_array_equal(np.sort(seen), np.arange(9))
    assert not hosts[1][-1]["mask"].any()  # Host 1's last batch is all padding, still yielded.
    with pytest.raises(errors.ConfigError, match="multiple of the 2 processes"):
        eval_stream(source, 5, process_count=2)


def test_eval_over_a_folder_source_reads_each_example_once_per_host(tmp_path):
    rng = np.random.default_rng(3)
    make_folder(tmp_path, "s", {"a": [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(5)],
                                "b": [rng.integers(0, 256, (40, 20, 3), dtype=np.uint8) for _ in range(4)]})
    source = sources.load(f"folder:{tmp_path}:s", image_size=8)
    hosts = [list(eval_stream(source, 4, image_size=8, process_index=p, process_count=2)) for p in (0, 1)]
    seen = np.concatenate([b["index"][b["mask"]] for host in hosts for b in host])
    np.testing.assert_array_equal(np.sort(seen), np.arange(9))
    expected = source.fetch(np.arange(9), 8)
    for host in hosts:
        for b in host:
            np.testing.assert_array_equal(b["image"][b["mask"]], expected[b["index"][b["mask"]]])


# ------------------------------------------------------------------------------------- without TensorFlow


@pytest.mark.slow
def test_data_training_and_evaluation_run_without_tensorflow(tmp_path):
    """The npz/noise/sklearn path and the whole smoke run with TensorFlow made unimportable."""
    code = f"""
import sys
sys.modules["tensorflow"] = None  # any import of it now raises ImportError
sys.modules["tensorflow_datasets"] = None
from contrastood import errors, train
from contrastood.configs import digits
from contrastood.data import sources
from contrastood.ood import evaluate
config = digits.get_config("smoke")
config.clp.run_after_evaluation = False
state = train.train_and_evaluate(config, {str(tmp_path / 'run')!r})
summary = evaluate.evaluate(config, {str(tmp_path / 'run')!r}, state=state)
assert summary["results"]["far_noise"]["gaussian"]["auroc"] > 0.5
try:
    sources.load("tfds:cifar10:test")
except errors.MissingDependencyError as error:
    assert "pip install" in str(error), error
    print("tfds refused:", error)
else:
    raise AssertionError("a tfds spec loaded without TensorFlow")
print("tensorflow imported:", any(name.startswith("tensorflow") and sys.modules[name] is not None
                                   for name in list(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow imported: False" in out.stdout and "tfds refused" in out.stdout


# ------------------------------------------------------------------------------------------- real data


def test_real_cifar10_test_npz(shared_data):
    source = sources.load(f"npz:{shared_data / 'cifar10-test.npz'}")
    assert source.image_shape == (32, 32) and len(source) == 10_000
    assert source.fetch(np.arange(3), 32).dtype == np.uint8
    assert source.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(source.labels), np.full(10, 1000))
    assert source.class_names == CIFAR10_NAMES and source.num_classes == 10

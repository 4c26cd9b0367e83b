"""Tests for contrastood.input_pipeline on tiny generated data, sklearn sources, mocked TFDS and the
real CIFAR-10 test file."""
import collections
import itertools
import pathlib

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image

from contrastood import input_pipeline as ip

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


def labelled_dataset(n: int, num_classes: int = 10, size: int = 2) -> ip.ArrayDataset:
    return ip.ArrayDataset(indexed_images(n, size), np.arange(n) % num_classes,
                           [f"c{i}" for i in range(num_classes)], num_classes, "test")


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
    spec = ip.parse_spec(" tfds:cifar10:3.0.2:train[:90%]#classes=0-5&limit=10 ")
    assert (spec.kind, spec.name, spec.split) == ("tfds", "cifar10:3.0.2", "train[:90%]")
    assert dict(spec.options) == {"classes": "0-5", "limit": "10"}
    assert spec.raw == "tfds:cifar10:3.0.2:train[:90%]#classes=0-5&limit=10"
    assert ip.parse_spec("tfds:svhn_cropped:test").name == "svhn_cropped"

    spec = ip.parse_spec("npz:/a/part1.npz+/a/part2.npz")
    assert (spec.kind, spec.name, spec.split, dict(spec.options)) == ("npz", "/a/part1.npz+/a/part2.npz", None, {})
    assert (ip.parse_spec("folder:/data/dtd:test").name, ip.parse_spec("folder:/data/dtd:test").split) == (
        "/data/dtd", "test")
    assert (ip.parse_spec("folder:/data/dtd").name, ip.parse_spec("folder:/data/dtd").split) == ("/data/dtd", None)
    assert ip.parse_spec("folder:gs://bucket/dtd").name == "gs://bucket/dtd"
    assert (ip.parse_spec("noise:gaussian").name, ip.parse_spec("noise:gaussian").split) == ("gaussian", None)
    assert ip.parse_spec("noise:uniform:500").split == "500"
    assert ip.parse_spec("sklearn:digits:test").split == "test"
    spec = ip.parse_spec("npz:x.npz#fraction=0:0.8&fraction_seed=3&classes=6,7&relabel=0")
    assert dict(spec.options) == {"fraction": "0:0.8", "fraction_seed": "3", "classes": "6,7", "relabel": "0"}
    assert spec == ip.parse_spec("npz:x.npz#fraction=0:0.8&fraction_seed=3&classes=6,7&relabel=0")
    hash(spec)  # Usable as a dict key.


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty"),
    ("imagenet:train", "valid kinds: tfds, npz, folder, noise, sklearn"),
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
    with pytest.raises(ValueError, match=message) as error:
        ip.parse_spec(spec)
    assert "Examples of valid specs" in str(error.value)


# -------------------------------------------------------------------------------------------- npz / folder


def test_npz_files_are_concatenated(tmp_path):
    part1 = write_npz(tmp_path / "p1.npz", indexed_images(6, 8), np.arange(6) % 3, ["a", "b", "c"])
    part2 = write_npz(tmp_path / "p2.npz", indexed_images(4, 8, offset=6), np.array([2, 2, 1, 0]))
    ds = ip.load_arrays(f"npz:{part1}+{part2}", image_size=8)
    assert ds.images.shape == (10, 8, 8, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(decode_index(ds.images), np.arange(10))
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 1, 2, 2, 2, 1, 0])
    assert ds.labels.dtype == np.int32
    assert (ds.class_names, ds.num_classes, ds.name) == (["a", "b", "c"], 3, f"npz:{part1}+{part2}")


def test_npz_resize_matches_pil_bilinear_and_grayscale_becomes_rgb(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ds = ip.load_arrays(f"npz:{write_npz(tmp_path / 'big.npz', big, np.full(2, -1))}", image_size=32)
    golden = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)) for x in big])
    assert ds.images.shape == (2, 32, 32, 3)
    assert np.abs(ds.images.astype(int) - golden).max() <= 1  # Antialiased bilinear, up to rounding.
    assert (ds.num_classes, ds.class_names) == (0, [])

    gray = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    ds = ip.load_arrays(f"npz:{write_npz(tmp_path / 'gray.npz', gray, np.zeros(3, int))}", image_size=16)
    for channel in range(3):
        np.testing.assert_array_equal(ds.images[..., channel], gray)
    assert (ds.class_names, ds.num_classes) == (["0"], 1)


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (1, 32, 64, 3), dtype=np.uint8)  # Already 32 high: only the crop.
    ds = ip.load_arrays(f"npz:{write_npz(tmp_path / 'wide.npz', wide, [-1])}", image_size=32)
    np.testing.assert_array_equal(ds.images[0], wide[0, :, 16:48])


@pytest.mark.parametrize("arrays, error, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": np.zeros(2, int)}, ValueError, "uint8"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.zeros(2, int)}, ValueError, r"\[N, H, W, 3\]"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, ValueError, "missing keys"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, int)}, ValueError, "shape"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0.0, 1.0])}, ValueError, "integers"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, -1])}, ValueError, "mix -1"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([-3, -3])}, ValueError, "labels must lie"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, 2]), "label_names": np.array(["a", "b"])},
     ValueError, "labels must lie"),
])
def test_bad_npz_contents_raise(tmp_path, arrays, error, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(error, match=message):
        ip.load_arrays(f"npz:{path}", image_size=4)


def test_missing_and_mismatched_npz_files_raise(tmp_path, labelled_npz):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ip.load_arrays(f"npz:{tmp_path / 'nope.npz'}")
    other = write_npz(tmp_path / "other.npz", indexed_images(2, 4), [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="disagree on label_names"):
        ip.load_arrays(f"npz:{labelled_npz}+{other}", image_size=4)
    with pytest.raises(ValueError, match="image_size"):
        ip.load_arrays(f"npz:{labelled_npz}", image_size=0)
    with pytest.raises(ValueError, match="selects no examples"):
        ip.load_arrays(f"npz:{write_npz(tmp_path / 'two.npz', indexed_images(2, 4), [0, 0], ['a', 'b'])}#classes=1",
                       image_size=4)


def test_folder_loading(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ant_gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    ant_wide = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "ant").mkdir(parents=True)
    Image.fromarray(cat[0]).save(tmp_path / "train" / "cat" / "0.png")
    Image.fromarray(cat[1]).save(tmp_path / "train" / "cat" / "1.PNG")
    Image.fromarray(ant_gray).save(tmp_path / "train" / "ant" / "a.png")
    Image.fromarray(ant_wide).save(tmp_path / "train" / "ant" / "b.png")
    Image.fromarray(cat[0]).save(tmp_path / "train" / "ant" / "c.jpg", quality=95)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    Image.fromarray(cat[1]).save(tmp_path / "test" / "cat" / "0.png")

    ds = ip.load_arrays(f"folder:{tmp_path}:train", image_size=32)
    assert ds.class_names == ["ant", "cat"] and ds.num_classes == 2  # Alphabetical, not creation order.
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1])
    assert ds.images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(ds.images[0], np.repeat(ant_gray[..., None], 3, axis=-1))
    pil = np.asarray(Image.fromarray(ant_wide).resize((43, 32), Image.BILINEAR))[:, 5:37]
    assert np.abs(ds.images[1].astype(int) - pil).max() <= 1
    decoded_by_pil = np.asarray(Image.open(tmp_path / "train" / "ant" / "c.jpg").convert("RGB"))
    np.testing.assert_array_equal(ds.images[2], decoded_by_pil)  # Accurate IDCT, as Pillow.
    np.testing.assert_array_equal(ds.images[3:], cat)  # PNG is lossless.

    no_split = ip.load_arrays(f"folder:{tmp_path / 'test'}", image_size=32)
    np.testing.assert_array_equal(no_split.images, cat[1:])
    assert no_split.class_names == ["ant", "cat"] and no_split.labels.tolist() == [1]

    with pytest.raises(FileNotFoundError, match="PATH/SPLIT/<class>"):
        ip.load_arrays(f"folder:{tmp_path}:val")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="No .png/.jpg/.jpeg images"):
        ip.load_arrays(f"folder:{tmp_path / 'empty'}")


# ------------------------------------------------------------------------------------ generated sources


def _clipped_normal_std(mean: float, std: float) -> float:
    density = scipy.stats.norm(mean, std).pdf
    first = scipy.integrate.quad(lambda x: x * density(x), 0, 1)[0] + scipy.stats.norm(mean, std).sf(1)
    second = scipy.integrate.quad(lambda x: x * x * density(x), 0, 1)[0] + scipy.stats.norm(mean, std).sf(1)
    return float(np.sqrt(second - first**2))


def test_noise_is_deterministic_per_index_and_has_the_right_statistics():
    small = ip.load_arrays("noise:gaussian:10", seed=3)
    large = ip.load_arrays("noise:gaussian:40", seed=3)
    np.testing.assert_array_equal(small.images, large.images[:10])
    assert not np.array_equal(small.images, ip.load_arrays("noise:gaussian:10", seed=4).images)
    assert not np.array_equal(large.images[0], large.images[1])
    assert (large.num_classes, large.class_names, set(large.labels.tolist())) == (0, [], {-1})

    gaussian = ip.load_arrays("noise:gaussian:100").images / 255.0
    assert gaussian.shape == (100, 32, 32, 3)
    assert gaussian.mean() == pytest.approx(0.5, abs=2e-3)
    assert gaussian.std() == pytest.approx(_clipped_normal_std(0.5, 0.25), abs=2e-3)  # ~0.2399
    # Clipping puts P(N(0.5, 0.25) > 1) = P(Z > 2) of the mass on each end.
    assert np.mean(gaussian == 1.0) == pytest.approx(scipy.stats.norm.sf(2.0), abs=2e-3)
    assert np.mean(gaussian == 0.0) == pytest.approx(scipy.stats.norm.sf(2.0), abs=2e-3)

    uniform = ip.load_arrays("noise:uniform:100", image_size=16).images / 255.0
    assert uniform.shape == (100, 16, 16, 3)
    assert uniform.mean() == pytest.approx(0.5, abs=3e-3)
    assert uniform.std() == pytest.approx(np.sqrt(1 / 12), abs=3e-3)


def test_sklearn_digits_split_is_stratified_disjoint_and_covering():
    digits = sklearn.datasets.load_digits()
    full = ip.load_arrays("sklearn:digits", image_size=8)
    np.testing.assert_array_equal(full.images[..., 0], np.round(digits.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(full.labels, digits.target)
    assert full.class_names == [str(i) for i in range(10)]

    train = ip.load_arrays("sklearn:digits:train", image_size=8)
    test = ip.load_arrays("sklearn:digits:test", image_size=8)
    assert (len(train), len(test)) == (1347, 450)
    as_bytes = lambda ds: collections.Counter(zip(map(bytes, ds.images), ds.labels.tolist()))
    assert as_bytes(train) + as_bytes(test) == as_bytes(full)  # A partition (multiset of examples).
    per_class = np.bincount(digits.target)
    assert np.all(np.abs(np.bincount(test.labels) - 0.25 * per_class) <= 1)

    big = ip.load_arrays("sklearn:digits:test", image_size=32)
    assert big.images.shape == (450, 32, 32, 3)
    np.testing.assert_array_equal(big.images[..., 0], big.images[..., 2])
    np.testing.assert_array_equal(big.labels, test.labels)


def test_sklearn_photos_are_deterministic_real_patches():
    few = ip.load_arrays("sklearn:photos:4", image_size=24)
    more = ip.load_arrays("sklearn:photos:9", image_size=24)
    assert more.images.shape == (9, 24, 24, 3) and more.num_classes == 0
    np.testing.assert_array_equal(few.images, more.images[:4])
    assert not np.array_equal(few.images, ip.load_arrays("sklearn:photos:4", image_size=24, seed=1).images)
    assert more.images.reshape(9, -1).std(axis=1).min() > 1  # Photo content, not flat fill.


# -------------------------------------------------------------------------------------------- options


def test_classes_option_selects_and_relabels(labelled_npz):
    near_ood = ip.load_arrays(f"npz:{labelled_npz}#classes=6-9", image_size=4)
    index = decode_index(near_ood.images)
    np.testing.assert_array_equal(index, [i for i in range(50) if i % 10 >= 6])
    np.testing.assert_array_equal(near_ood.labels, index % 10 - 6)
    assert (near_ood.num_classes, near_ood.class_names) == (4, CIFAR10_NAMES[6:])

    listed_order = ip.load_arrays(f"npz:{labelled_npz}#classes=3,1", image_size=4)
    original = decode_index(listed_order.images) % 10
    np.testing.assert_array_equal(listed_order.labels, np.where(original == 3, 0, 1))
    assert listed_order.class_names == ["cat", "automobile"]

    kept = ip.load_arrays(f"npz:{labelled_npz}#classes=3,1&relabel=0", image_size=4)
    np.testing.assert_array_equal(kept.labels, decode_index(kept.images) % 10)
    assert (kept.num_classes, kept.class_names) == (10, CIFAR10_NAMES)

    with pytest.raises(ValueError, match=r"do not exist; valid ids are 0\.\.9"):
        ip.load_arrays(f"npz:{labelled_npz}#classes=8-10", image_size=4)
    with pytest.raises(ValueError, match="needs a labelled dataset"):
        ip.load_arrays("noise:uniform:5#classes=0")


def test_fraction_splits_are_disjoint_covering_and_seeded(labelled_npz):
    load = lambda options: decode_index(ip.load_arrays(f"npz:{labelled_npz}#{options}", image_size=4).images)
    head, tail = load("fraction=0:0.8"), load("fraction=0.8:1")
    assert (len(head), len(tail)) == (40, 10)
    assert np.all(np.diff(head) > 0)  # Source order kept.
    assert set(head).isdisjoint(tail) and set(head) | set(tail) == set(range(50))
    assert not np.array_equal(head, np.arange(40))  # A permutation, not a prefix.
    np.testing.assert_array_equal(head, load("fraction=0:0.8&fraction_seed=0"))
    other = load("fraction=0:0.8&fraction_seed=1")
    assert len(other) == 40 and set(other) != set(head)
    # fraction is applied before classes, so class filters partition the same split.
    class_one = load("fraction=0:0.5&classes=1")
    assert set(class_one) == {i for i in load("fraction=0:0.5") if i % 10 == 1}
    np.testing.assert_array_equal(load("limit=7"), np.arange(7))
    np.testing.assert_array_equal(load("classes=2&limit=3"), [2, 12, 22])
    np.testing.assert_array_equal(load("limit=500"), np.arange(50))


def test_union_offsets_labels_and_makes_unlabelled_sets_one_class(tmp_path):
    three = write_npz(tmp_path / "three.npz", indexed_images(6, 8), [2, 1, 0, 0, 1, 2], ["x", "y", "z"])
    specs = ["sklearn:digits:test", "noise:uniform:20", f"npz:{three}"]
    union, parts = ip.load_union(specs, image_size=8)
    assert parts == [
        ip.UnionPart(specs[0], 0, 10, [str(i) for i in range(10)]),
        ip.UnionPart(specs[1], 10, 1, [specs[1]]),
        ip.UnionPart(specs[2], 11, 3, ["x", "y", "z"]),
    ]
    assert union.num_classes == 14 and len(union.class_names) == 14 and len(union) == 450 + 20 + 6
    digits = ip.load_arrays(specs[0], image_size=8)
    np.testing.assert_array_equal(union.labels[:450], digits.labels)
    np.testing.assert_array_equal(union.images[:450], digits.images)
    np.testing.assert_array_equal(union.labels[450:470], np.full(20, 10))
    np.testing.assert_array_equal(union.labels[470:], np.array([2, 1, 0, 0, 1, 2]) + 11)
    with pytest.raises(ValueError, match="non-empty list"):
        ip.load_union("noise:uniform:5")


# ------------------------------------------------------------------------------------------- TFDS (mocked)


def test_tfds_spec_with_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        ds = ip.load_arrays("tfds:cifar10:train", image_size=16)
        mnist = ip.load_arrays("tfds:mnist:test#limit=4", image_size=32)
    assert ds.images.shape == (6, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() and ds.labels.max() < 10
    assert ds.images.std() > 10  # Random mock pixels survived the resize.
    assert mnist.images.shape == (4, 32, 32, 3)  # 28x28 grayscale -> 32x32 RGB.
    np.testing.assert_array_equal(mnist.images[..., 0], mnist.images[..., 1])
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset_xyz'"):
        ip.load_arrays("tfds:no_such_dataset_xyz:train")


# ------------------------------------------------------------------------------------------ train_batches


def test_train_batches_are_deterministic_and_resume_exactly():
    ds = labelled_dataset(10)
    stream = take(ip.train_batches(ds, global_batch_size=4, seed=0, process_count=1, process_index=0), 12)
    assert stream[0]["image"].shape == (4, 2, 2, 3) and stream[0]["image"].dtype == np.uint8
    assert stream[0]["label"].shape == (4,) and stream[0]["label"].dtype == np.int32
    for batch in stream:  # Labels travel with their images.
        np.testing.assert_array_equal(batch["label"], decode_index(batch["image"]) % 10)
    synchronous = take(ip.train_batches(ds, global_batch_size=4, seed=0, process_count=1, process_index=0,
                                        prefetch=0), 12)
    assert_batches_equal(stream, synchronous)
    resumed = take(ip.train_batches(ds, global_batch_size=4, seed=0, start_step=5, process_count=1,
                                    process_index=0), 7)
    assert_batches_equal(stream[5:], resumed)
    other_seed = take(ip.train_batches(ds, global_batch_size=4, seed=1, process_count=1, process_index=0), 12)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(stream, other_seed))


def test_epoch_sampling_sees_every_example_once_per_epoch():
    ds = labelled_dataset(10)
    stream = take(ip.train_batches(ds, global_batch_size=4, seed=0, process_count=1, process_index=0), 10)
    index = np.concatenate([decode_index(b["image"]) for b in stream]).reshape(4, 10)  # 40 = 4 epochs.
    for epoch in index:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
    assert len({tuple(epoch) for epoch in index}) > 1  # Reshuffled each epoch.


@pytest.mark.parametrize("sampling", ["epoch", "uniform_class"])
def test_two_processes_split_the_global_batch(sampling):
    ds = labelled_dataset(13, num_classes=3)
    kwargs = dict(global_batch_size=6, seed=2, sampling=sampling)
    global_stream = take(ip.train_batches(ds, process_index=0, process_count=1, **kwargs), 5)
    host0 = take(ip.train_batches(ds, process_index=0, process_count=2, **kwargs), 5)
    host1 = take(ip.train_batches(ds, process_index=1, process_count=2, **kwargs), 5)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(host0, host1)]
    assert host0[0]["image"].shape[0] == 3
    assert_batches_equal(global_stream, joined)


def test_uniform_class_sampling_balances_an_imbalanced_set():
    labels = np.repeat([0, 1, 2], [60, 6, 1])
    ds = ip.ArrayDataset(indexed_images(67), labels, ["big", "small", "tiny"], 3, "imbalanced")
    stream = take(ip.train_batches(ds, global_batch_size=30, seed=0, sampling="uniform_class",
                                   process_index=0, process_count=1), 100)
    drawn = np.concatenate([b["label"] for b in stream])
    index = np.concatenate([decode_index(b["image"]) for b in stream])
    np.testing.assert_array_equal(labels[index], drawn)
    counts = np.bincount(drawn, minlength=3)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts
    assert len(np.unique(index[drawn == 0])) > 50  # Uniform within a class too.
    epoch = take(ip.train_batches(ds, global_batch_size=30, seed=0, process_index=0, process_count=1), 100)
    assert np.bincount(np.concatenate([b["label"] for b in epoch]))[0] > 0.85 * 3000  # Contrast: 60/67.


def test_train_batches_errors():
    ds = labelled_dataset(10)
    with pytest.raises(ValueError, match="multiple of process_count=4"):
        ip.train_batches(ds, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="epoch, uniform_class"):
        ip.train_batches(ds, global_batch_size=4, seed=0, sampling="balanced", process_index=0, process_count=1)
    unlabelled = ip.ArrayDataset(indexed_images(4), np.full(4, -1), [], 0, "noise")
    with pytest.raises(ValueError, match="needs labels"):
        ip.train_batches(unlabelled, global_batch_size=2, seed=0, sampling="uniform_class", process_index=0,
                         process_count=1)
    empty = ip.ArrayDataset(np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, int), [], 0, "empty")
    with pytest.raises(ValueError, match="empty dataset"):
        ip.train_batches(empty, global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        ip.train_batches(ds, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="uint8"):
        ip.ArrayDataset(np.zeros((2, 2, 2, 3), np.float32), np.zeros(2, int), ["a"], 1, "floats")


def test_prefetch_thread_reraises_producer_errors():
    def produce(step):
        if step == 3:
            raise RuntimeError("boom at 3")
        return step

    stream = ip._prefetch(produce, itertools.count(), buffer_size=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="boom at 3"):
        next(stream)


# ------------------------------------------------------------------------------------------- eval_batches


def test_eval_batches_pad_and_mask_the_last_batch():
    ds = labelled_dataset(10)
    stream = ip.eval_batches(ds, global_batch_size=4, process_index=0, process_count=1)
    assert (stream.num_examples, stream.num_batches, len(stream)) == (10, 3, 3)
    batches = list(stream)
    assert len(batches) == 3
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    last = batches[-1]
    np.testing.assert_array_equal(last["index"], [8, 9, -1, -1])
    np.testing.assert_array_equal(last["label"][2:], [-1, -1])
    assert not last["image"][2:].any()
    index = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(index, np.arange(10))
    for b in batches:
        np.testing.assert_array_equal(decode_index(b["image"][b["mask"]]), b["index"][b["mask"]])
        np.testing.assert_array_equal(b["label"][b["mask"]], ds.labels[b["index"][b["mask"]]])
        assert b["index"].dtype == np.int32 and b["mask"].dtype == bool and b["label"].dtype == np.int32
    assert_batches_equal(batches, list(stream))  # Re-iterable.


def test_eval_batches_across_two_processes():
    ds = labelled_dataset(9)
    single = list(ip.eval_batches(ds, global_batch_size=4, process_index=0, process_count=1))
    hosts = [list(ip.eval_batches(ds, global_batch_size=4, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(hosts[0]) == len(hosts[1]) == len(single) == 3  # Same count on every host.
    assert hosts[0][0]["image"].shape == (2, 2, 2, 3)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*hosts)]
    assert_batches_equal(single, joined)
    seen = np.concatenate([b["index"][b["mask"]] for host in hosts for b in host])
    np.testing.assert_array_equal(np.sort(seen), np.arange(9))
    assert not hosts[1][-1]["mask"].any()  # Host 1's last batch is all padding, still yielded.
    with pytest.raises(ValueError, match="multiple of process_count"):
        ip.eval_batches(ds, global_batch_size=5, process_index=0, process_count=2)


def test_eval_batches_from_a_spec():
    # process_index/process_count default to jax.process_index()/process_count() (0 and 1 here).
    stream = ip.eval_batches("sklearn:digits:test", global_batch_size=64, image_size=8)
    assert (stream.num_examples, stream.num_batches) == (450, 8)
    assert sum(int(b["mask"].sum()) for b in stream) == 450


# ------------------------------------------------------------------------------------------- real data


def test_real_cifar10_test_npz(shared_data):
    ds = ip.load_arrays(f"npz:{shared_data / 'cifar10-test.npz'}")
    assert ds.images.shape == (10_000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))
    assert ds.class_names == CIFAR10_NAMES and ds.num_classes == 10

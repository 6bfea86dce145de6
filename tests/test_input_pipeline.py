"""The data sources: the papers' tfds datasets on tfds's mock data (CIFAR-10 cannot be downloaded
here), any tfds dataset on one the test makes, folders of images the test writes, and the batch of
a step as a function of (seed, process, step)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax import errors, image_files, input_pipeline


def test_cifar10_through_tfds():
    """The real tfds path (builder, per-process even split, decode) on mock data. The mock serves every
    sub-split in full, so the disjointness of process shares is tested on the digits path instead."""
    with tfds.testing.mock_data(num_examples=20):
        images = input_pipeline.load("cifar10", "train", image_size=32, process_index=1, process_count=2)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert len(np.unique(images)) > 100


def test_larger_images_are_center_cropped_and_resized():
    with tfds.testing.mock_data(num_examples=4):
        images = input_pipeline.load("lsun_church", "train", image_size=64)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8


def test_missing_dataset_names_itself_and_the_fix(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotPreparedError,
                       match=r"dataset 'cifar10' is not prepared in .*download_and_prepare"):
        input_pipeline.load("cifar10", "train", image_size=32, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: one of digits, cifar10"):
        input_pipeline.load("mnist", "train", image_size=28)


def test_batches_are_a_function_of_seed_and_step():
    images = input_pipeline.digits("train")
    a = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=True)["image"]
    b = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=True)["image"]
    c = input_pipeline.make_batch(images, 8, batch_size=16, seed=1, randflip=True)["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    flipped = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=False)["image"]
    same = [np.array_equal(a[i], flipped[i]) for i in range(16)]
    mirrored = [np.array_equal(a[i], flipped[i, :, ::-1]) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 0 < sum(mirrored) < 16


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset made in the test: image i of its own size, every pixel 10 i, its class label i % 3;
    the features' names are not the usual ones."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(None, None, 3)),
            "kind": tfds.features.ClassLabel(names=["cat", "dog", "fish"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.full((20 + i, 30 - i, 3), 10 * i, np.uint8)
            yield i, {"picture": image, "kind": i % 3}


def test_any_tfds_dataset_with_an_image_feature_by_name(tmp_path):
    TinyImages(data_dir=str(tmp_path)).download_and_prepare()
    examples = input_pipeline.load_examples("tfds:tiny_images", "train", image_size=8, channels=3,
                                            data_dir=str(tmp_path))
    assert examples.images.shape == (10, 8, 8, 3) and examples.images.dtype == np.uint8
    order = np.argsort(examples.images[:, 0, 0, 0])  # tfds's order is its own: sort by the index
    np.testing.assert_array_equal(examples.images[order, 4, 4, 0], 10 * np.arange(10))
    np.testing.assert_array_equal(examples.labels[order], np.arange(10) % 3)
    grey = input_pipeline.load("tfds:tiny_images:test", "train", image_size=8, channels=1,
                               data_dir=str(tmp_path))
    assert grey.shape == (4, 8, 8, 1)
    assert input_pipeline.num_examples("tfds:tiny_images:test", "train", data_dir=str(tmp_path)) == 4
    assert input_pipeline.num_examples("tfds:tiny_images", "train", data_dir=str(tmp_path),
                                       process_index=1, process_count=2) == 5
    with pytest.raises(errors.DataError, match="tfds has no dataset 'no_such_images'"):
        input_pipeline.num_examples("tfds:no_such_images", "train")
    with pytest.raises(errors.DataError, match="tfds dataset 'tiny_images' has no split 'valid'; it has"):
        input_pipeline.num_examples("tfds:tiny_images:valid", "train", data_dir=str(tmp_path))
    with pytest.raises(input_pipeline.DatasetNotPreparedError, match="'tiny_images' is not prepared"):
        input_pipeline.num_examples("tfds:tiny_images", "train", data_dir=str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("name", ["mnist", "folder:", "tfds", "s3:bucket"])
def test_an_unknown_source_names_the_allowed_ones(name):
    with pytest.raises(errors.ConfigError, match="allowed: one of digits, cifar10, .* prepared:DIR"):
        input_pipeline.parse(name)


def write_folder(root, count=30, classes=("ants", "bees", "wasps"), size=(12, 20)):
    """``count`` PNGs spread over class subfolders: image i has the value i in its green channel and
    its class's index x 100 in its red channel, so that content names both."""
    for i in range(count):
        label = i % len(classes)
        image = np.zeros(size + (3,), np.uint8)
        image[..., 0], image[..., 1] = 100 * label, i
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / classes[label] / f"{i:03d}.png")


def test_a_folder_streams_labels_with_their_images_and_resumes_where_it_was(tmp_path):
    write_folder(tmp_path)
    share = input_pipeline.open_share(f"folder:{tmp_path}", "train", image_size=8, channels=3)
    kwargs = dict(batch_size=10, seed=5, randflip=True)
    straight = input_pipeline.batches(share, 0, **kwargs)
    first = [next(straight) for _ in range(8)]  # 80 examples: nearly 3 epochs of 30
    straight.close()
    for batch in first:
        assert batch["image"].shape == (10, 8, 8, 3) and batch["image"].dtype == np.float32
        red = np.round((batch["image"][:, 4, 4, 0] + 1) * 127.5)
        np.testing.assert_array_equal(red, 100 * batch["label"])  # each image with its own label
    green = [np.round((b["image"][:, 4, 4, 1] + 1) * 127.5).astype(int) for b in first]
    epochs = np.concatenate(green)[:60].reshape(2, 30)
    assert all(sorted(e) == list(range(30)) for e in epochs)  # each epoch a permutation
    assert not np.array_equal(epochs[0], epochs[1])  # and a different one
    resumed = input_pipeline.batches(share, 5, **kwargs)
    for step in range(5, 8):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], first[step]["image"])
        np.testing.assert_array_equal(batch["label"], first[step]["label"])
        np.testing.assert_array_equal(share.batch(step, **kwargs)["image"], first[step]["image"])
    resumed.close()


def test_the_check_of_a_folder_lists_it_once_and_hands_over_the_share_it_opened(tmp_path, monkeypatch):
    write_folder(tmp_path, count=12)
    listings = []
    list_folder = image_files.list_folder
    monkeypatch.setattr(image_files, "list_folder", lambda path: listings.append(path) or list_folder(path))
    check = dict(image_size=8, channels=3, batch_size=6)
    share = input_pipeline.check(f"folder:{tmp_path}", "train", num_classes=3, **check)
    assert len(listings) == 1 and len(share) == 12 and share.classes == ("ants", "bees", "wasps")
    with pytest.raises(errors.ConfigError, match="has 3 classes .*set model.num_classes = 3"):
        input_pipeline.check(f"folder:{tmp_path}", "train", num_classes=2, **check)
    with pytest.raises(errors.ConfigError, match="a batch of 6 images a process is more than the 4"):
        input_pipeline.check(f"folder:{tmp_path}", "train", process_index=2, process_count=3, **check)
    assert input_pipeline.check("digits", "train", image_size=16, channels=1, batch_size=8) is None


def test_two_processes_read_disjoint_halves_of_a_folder(tmp_path):
    write_folder(tmp_path, count=21)
    halves = [input_pipeline.open_share(f"folder:{tmp_path}", "train", image_size=8, channels=3,
                                        process_index=i, process_count=2) for i in range(2)]
    seen = [{int(image[4, 4, 1]) for image in half.images[np.arange(len(half))]} for half in halves]
    assert (len(halves[0]), len(halves[1])) == (11, 10)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(21))


def test_a_tfds_dataset_prepared_as_records_streams_with_its_labels(tmp_path, capsys):
    from diffusion_jax import prepare_data

    TinyImages(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    out = tmp_path / "prepared"
    assert prepare_data.main(["--source=tfds:tiny_images", "--image_size=8", f"--out={out}",
                              f"--data_dir={tmp_path / 'tfds'}", "--images_per_shard=3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 10 images of 8x8 in 4 shards to {out}"
    assert prepare_data.main(["--source=tfds:tiny_images:test", "--image_size=8", f"--out={out}",
                              f"--data_dir={tmp_path / 'tfds'}", "--split=test"]) == 0
    memory = input_pipeline.load_examples("tfds:tiny_images", "train", image_size=8, channels=3,
                                          data_dir=str(tmp_path / "tfds"))
    halves = [input_pipeline.open_share(f"prepared:{out}", "train", image_size=8, channels=3,
                                        process_index=i, process_count=2) for i in range(2)]
    pairs = [half.example(i) for half in halves for i in range(len(half))]
    assert [len(half) for half in halves] == [5, 5]
    np.testing.assert_array_equal(np.stack([p[0] for p in pairs]), memory.images)  # tfds's order kept
    np.testing.assert_array_equal([p[1] for p in pairs], memory.labels)
    assert len(input_pipeline.open_share(f"prepared:{out}", "test", image_size=8, channels=3)) == 4
    with pytest.raises(errors.ConfigError, match="holds 8x8 images of 3 channels; the config asks for 16x16"):
        input_pipeline.open_share(f"prepared:{out}", "train", image_size=16, channels=3)


def test_an_unreadable_file_in_a_folder_stops_the_batches_naming_it(tmp_path):
    write_folder(tmp_path, count=12)
    (tmp_path / "ants" / "009.png").write_bytes(b"not a png at all")
    share = input_pipeline.open_share(f"folder:{tmp_path}", "train", image_size=8, channels=3)
    iterator = input_pipeline.batches(share, 0, batch_size=12, seed=0, randflip=False)  # every image
    with pytest.raises(errors.DataError, match="009.png"):
        next(iterator)
    iterator.close()

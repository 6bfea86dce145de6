"""The tfds loading path, on tfds's mock data (CIFAR-10 cannot be downloaded here)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import input_pipeline


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
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: digits, cifar10"):
        input_pipeline.load("mnist", "train", image_size=28)


def test_batches_are_a_function_of_seed_and_step():
    images = input_pipeline.digits("train")
    a = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=True)
    b = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=True)
    c = input_pipeline.make_batch(images, 8, batch_size=16, seed=1, randflip=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1
    flipped = input_pipeline.make_batch(images, 7, batch_size=16, seed=1, randflip=False)
    same = [np.array_equal(a[i], flipped[i]) for i in range(16)]
    mirrored = [np.array_equal(a[i], flipped[i, :, ::-1]) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and 0 < sum(mirrored) < 16

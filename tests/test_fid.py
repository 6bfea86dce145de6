"""FID and IS on a random-weight Inception: orderings and limits that hold for any weights; files and
errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scripts

from diffusion_jax import errors, input_pipeline
from diffusion_jax.evaluation import fid, inception


@pytest.fixture(scope="module")
def extractor():
    return inception.Extractor(inception.random_params(), batch_size=100)


def fid_of(extractor, a, b):
    sa, sb = fid.statistics(extractor(a)[0]), fid.statistics(extractor(b)[0])
    return fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


@pytest.mark.slow
def test_fid_ranks_a_shifted_copy_farther_than_another_half_of_the_same_set(extractor):
    digits = input_pipeline.digits("train")[:200]
    half_a, half_b = digits[:100], digits[100:]
    shifted = np.clip(half_a.astype(np.int32) + 60, 0, 255).astype(np.uint8)
    same_set = fid_of(extractor, half_a, half_b)
    assert 0 < same_set < fid_of(extractor, half_a, shifted)


def test_features_do_not_depend_on_how_the_images_are_batched(extractor):
    images = input_pipeline.digits("test")[:5]
    whole = extractor(images)  # one batch of 5
    split = inception.Extractor(extractor.params, batch_size=2)(images)  # three of 2, the last padded
    for a, b in zip(whole, split, strict=True):
        assert a.shape == b.shape and np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def to_bfloat16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def bfloat16_inputs(next_fun, args, kwargs, context):
    """A flax interceptor: the input of every convolution and dense layer rounded to bfloat16."""
    if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
        args = (to_bfloat16(args[0]),) + args[1:]
    return next_fun(*args, **kwargs)


@pytest.mark.slow
def test_one_bfloat16_pass_would_move_the_features_and_the_fid(extractor):
    """What evaluating at 'highest' precision protects: a TPU's default for float32 products, one
    bfloat16 pass (operands rounded to bfloat16, float32 accumulation), emulated here. On 2 x 100
    digits with the random weights: features 0.68% off on average, the FID between the halves 1.5%
    higher, and a set's features computed both ways 0.064 apart, 14% of that FID (docs/design.md)."""
    kernels = jax.tree_util.tree_map_with_path(
        lambda path, x: to_bfloat16(x) if path[-1].key == "kernel" else x, extractor.params)

    @jax.jit
    def one_pass(params, images):
        with nn.intercept_methods(bfloat16_inputs):
            return inception.InceptionV3().apply({"params": params}, images)[0]

    digits = input_pipeline.digits("train")[:200]
    exact = [extractor(half)[0] for half in (digits[:100], digits[100:])]
    rounded = [np.asarray(one_pass(kernels, half), np.float64) for half in (digits[:100], digits[100:])]
    moved = np.mean(np.abs(rounded[0] - exact[0])) / np.mean(np.abs(exact[0]))
    distance = lambda a, b: fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))  # noqa: E731
    fid_exact, fid_rounded, apart = distance(*exact), distance(*rounded), distance(exact[0], rounded[0])
    print(f"one bfloat16 pass: features {moved:.2%} off; FID {fid_exact:.4f} -> {fid_rounded:.4f}; "
          f"a set against itself {apart:.4f}")
    assert moved > 1e-3 and abs(fid_rounded / fid_exact - 1) > 5e-3 and apart > 0.05 * fid_exact


def test_inception_score_of_one_class_is_one(extractor):
    image = input_pipeline.digits("test")[:1]
    _, logits = extractor(np.repeat(image, 20, axis=0))
    mean, std = fid.inception_score(logits, splits=10)
    assert abs(mean - 1.0) < 1e-6 and std < 1e-6


def test_inception_score_grows_with_confident_distinct_classes():
    logits = np.full((1008, 1008), -30.0)
    np.fill_diagonal(logits, 30.0)  # every image a different, certain class
    mean, _ = fid.inception_score(logits, splits=4)
    np.testing.assert_allclose(mean, 252, rtol=1e-6)  # exp(log 252) in each part of 252 classes


def test_frechet_distance_is_zero_for_equal_and_symmetric():
    rng = np.random.default_rng(0)
    s1, s2 = fid.statistics(rng.normal(size=(200, 16))), fid.statistics(rng.normal(size=(200, 16)) + 0.3)
    assert abs(fid.frechet_distance(*s1, *s1)) < 1e-8
    np.testing.assert_allclose(fid.frechet_distance(*s1, *s2), fid.frechet_distance(*s2, *s1), rtol=1e-9)
    # for equal covariances only the means count
    np.testing.assert_allclose(fid.frechet_distance(s1.mu, s1.sigma, s1.mu + 1.0, s1.sigma), 16.0, rtol=1e-6)


def test_matrices_that_are_not_covariances_are_refused():
    s = fid.statistics(np.random.default_rng(0).normal(size=(50, 4)))
    skewed = s.sigma.copy()
    skewed[0, 1] += 1.0
    with pytest.raises(ValueError, match="sigma2 is not a covariance matrix: it is not symmetric"):
        fid.frechet_distance(s.mu, s.sigma, s.mu, skewed)
    indefinite = s.sigma - 2.0 * np.max(s.sigma) * np.eye(4)
    for first, second, name in ((indefinite, s.sigma, "sigma1"), (s.sigma, indefinite, "sigma2")):
        with pytest.raises(ValueError, match=f"{name} is not a covariance matrix: it has the eigenvalue"):
            fid.frechet_distance(s.mu, first, s.mu, second)


def test_statistics_round_trip_and_bad_files(tmp_path):
    stats = fid.statistics(np.random.default_rng(0).normal(size=(10, 4)))
    fid.save_statistics(str(tmp_path / "s.npz"), stats)
    back = fid.load_statistics(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="needs arrays 'mu' and 'sigma'"):
        fid.load_statistics(str(tmp_path / "bad.npz"))


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(errors.DataError, match="releases/download/fid_weights/pt_inception-2015-12-05"):
        inception.weights_path(str(tmp_path / "nowhere.pth"))


def test_weights_of_another_network_are_refused(tmp_path):
    np.savez(tmp_path / "other.npz", **{"fc/kernel": np.zeros((2048, 1000), np.float32)})
    with pytest.raises(ValueError, match="is not pytorch-fid's FID Inception"):
        inception.load_params(str(tmp_path / "other.npz"))


@pytest.mark.parametrize("array, problem", [
    (np.zeros((4, 8, 8, 3), np.float32), "float32"),
    (np.zeros((4, 8, 8), np.uint8), "shape (4, 8, 8)"),
    (np.zeros((4, 8, 8, 4), np.uint8), "shape (4, 8, 8, 4)"),
])
@pytest.mark.integration
def test_sample_files_must_be_uint8_nhwc(tmp_path, array, problem):
    np.savez(tmp_path / "s.npz", array)
    with pytest.raises(ValueError, match="must be uint8 images"):
        fid.load_samples(str(tmp_path / "s.npz"))
    result = scripts.run("evaluate.py", "--mode=fid", f"--samples={tmp_path / 's.npz'}", expect=6)
    assert problem in result.stderr and "must be uint8 images" in result.stderr

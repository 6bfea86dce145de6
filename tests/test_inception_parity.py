"""The Flax Inception against pytorch-fid's InceptionV3, and our Frechet distance against pytorch-fid's."""

import numpy as np
import pytest
import torch
from pytorch_fid import fid_score
from pytorch_fid import inception as pytorch_fid_inception

from diffusion_jax.evaluation import fid, inception

pytestmark = pytest.mark.parity


def random_state_dict(seed=0):
    """A random FID-Inception state dict: conv weights at fan-in scale, BatchNorm statistics and fc random."""
    reference = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name.endswith(".conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=generator) * np.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=generator)
        elif name.endswith(".bn.weight"):
            state[name] = 0.8 + 0.4 * torch.rand(shape, generator=generator)
        else:  # bn bias, running_mean, fc bias
            state[name] = 0.1 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def networks(tmp_path_factory, monkeypatch_module):
    """pytorch-fid's InceptionV3 with random weights (its download patched out) and our port of the same
    file."""
    state = random_state_dict()
    path = str(tmp_path_factory.mktemp("weights") / inception.WEIGHTS_FILE)
    torch.save(state, path)
    monkeypatch_module.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    torch_model = pytorch_fid_inception.InceptionV3([3]).eval()
    return torch_model, inception.load_params(path), path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def torch_features(model, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
    with torch.no_grad():
        return model(x)[0][:, :, 0, 0].numpy()


def relative_error(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("size", [32, 299])
def test_pool_features_and_logits_equal_pytorch_fid(networks, size):
    torch_model, params, path = networks
    images = np.random.default_rng(size).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    reference = torch_features(torch_model, images)
    pool, logits = inception.Extractor(params, batch_size=4)(images)
    assert np.max(np.abs(reference)) > 0.1  # activations survive the random network
    # max abs difference relative to the largest feature: the features are post-ReLU means, many
    # near 0, so an elementwise relative tolerance would be meaningless for those
    assert relative_error(pool, reference) < 1e-4
    state = torch.load(path, weights_only=True)
    ref_logits = torch.from_numpy(reference) @ state["fc.weight"].T + state["fc.bias"]
    assert relative_error(logits, ref_logits.numpy()) < 1e-4


def test_resize_equals_torch_interpolate():
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_converted_npz_gives_the_same_features(networks, tmp_path):
    _, params, path = networks
    out = str(tmp_path / "weights.npz")
    assert inception.main(["--convert", path, "--out", out]) == 0
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    extractor = inception.Extractor(params, batch_size=2)
    np.testing.assert_array_equal(extractor(images)[0],
                                  inception.Extractor(inception.load_params(out), 2)(images)[0])


@pytest.mark.parametrize("dim", [64, 2048])
def test_frechet_distance_equals_pytorch_fid(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(3 * dim, dim))
    b = 0.9 * rng.normal(size=(3 * dim, dim)) @ (np.eye(dim) + 0.05 * rng.normal(size=(dim, dim))) + 0.1
    sa, sb = fid.statistics(a), fid.statistics(b)
    ours = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    reference = fid_score.calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert abs(ours - reference) <= 1e-6 * abs(reference)

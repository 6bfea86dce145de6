"""checkpoints.load: training workdirs and converted checkpoints give the same model; misfits are refused."""

import dataclasses

import numpy as np
import pytest
import scripts

from diffusion_jax import builders, checkpoints, convert
from diffusion_jax import config as config_lib

pytestmark = pytest.mark.integration

QUICKSTART = f"--config={scripts.ROOT}/configs/quickstart.py"


def converted(workdir, directory):
    """The EMA params of a quickstart run, saved as convert.py saves."""
    config, params, _ = checkpoints.load(workdir=workdir)
    unet = builders.make_model(config)
    kwargs = {f.name: getattr(unet, f.name) for f in dataclasses.fields(unet)
              if f.name not in ("parent", "name", "dropout", "dtype")}
    convert.save(directory, params, kwargs, (config.data.image_size,) * 2 + (config.data.channels,))
    return directory


def test_a_converted_checkpoint_samples_as_its_training_run(quickstart_workdir, tmp_path):
    path = converted(quickstart_workdir, str(tmp_path / "converted"))
    args = ["--num_samples=16", "--batch_size=16", "--steps=5"]
    scripts.run("sample.py", f"--workdir={quickstart_workdir}", f"--out={tmp_path / 'a'}", *args)
    scripts.run("sample.py", f"--checkpoint={path}", QUICKSTART, f"--out={tmp_path / 'b'}", *args)
    step_dir = f"{quickstart_workdir}/checkpoints/300"
    scripts.run("sample.py", f"--checkpoint={step_dir}", f"--out={tmp_path / 'c'}", *args)
    a, b, c = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_a_converted_checkpoint_that_does_not_fit_the_config_is_refused(quickstart_workdir, tmp_path):
    path = converted(quickstart_workdir, str(tmp_path / "converted"))
    config = config_lib.base()
    config.data.channels = 1
    config.diffusion.update(var_type="learned", loss_type="kl")  # twice the network's outputs
    with pytest.raises(ValueError, match="does not fit the config"):
        checkpoints.load(checkpoint=path, config=config)
    with pytest.raises(ValueError, match="one set of parameters"):
        checkpoints.load(checkpoint=path, which="raw")
    result = scripts.run("sample.py", f"--checkpoint={path}", f"--out={tmp_path / 'o'}", expect=2)
    assert "does not fit the config" in result.stderr  # configs/cifar10.py's 3 channels, not the digits' 1


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint"):
        checkpoints.load(checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="holds no checkpoints"):
        checkpoints.load(workdir=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of"):
        checkpoints.load()

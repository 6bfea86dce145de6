"""The package as pip builds and installs it (pyproject.toml, setup.py), from a copy of the repository.

Each test builds from its own copy of the files git tracks or would track (not the ignored
build/, .venv or diffusion_jax/_onednn_conv*.so of the work tree), and runs what it installed
from a working directory outside the repository, so that only the installed package is imported.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import BytesParser

import pytest
import scripts
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

XLA_LINE = "the CPU convolutions will be XLA's"  # setup.py's line when it builds without oneDNN
# prints the file of each module named in its arguments, imported in turn
IMPORT_EACH = ("import importlib, json, sys\n"
               "print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))")


def pinned(name):
    """The version requirements.txt pins ``name`` at."""
    for line in pathlib.Path(scripts.ROOT, "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            (specifier,) = Requirement(line).specifier
            return specifier.version
    raise LookupError(f"{name} is not in requirements.txt")


@pytest.fixture
def source(tmp_path):
    """A copy of the repository's files, without what builds and installs leave in the work tree."""
    return scripts.copy_repository(tmp_path / "source")


def pip(*args, **kwargs):
    """``python -m pip ARGS`` with this test's Python, its output captured."""
    return subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False, **kwargs)


def python(cwd, *args, **variables):
    """This test's Python in ``cwd``, in scripts.environment() with ``variables``."""
    return subprocess.run([sys.executable, *map(str, args)], env=dict(scripts.environment(), **variables),
                          cwd=cwd, capture_output=True, text=True, timeout=900, check=False)


def test_the_wheel_holds_every_module_and_they_import_in_a_new_environment(source, tmp_path):
    built = pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheels", source)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("diffusion_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [BytesParser().parsebytes(z.read(n)) for n in names
                       if n.endswith(".dist-info/METADATA")]
    modules = sorted(n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                     for n in names if n.endswith(".py"))
    expected = {"diffusion_jax.train_lib", "diffusion_jax.evaluation.fid", "diffusion_jax.models.unet"}
    assert expected <= {*modules}, modules
    core = {canonicalize_name(r.name): r for r in map(Requirement, metadata.get_all("Requires-Dist"))
            if r.marker is None or "extra" not in str(r.marker)}
    for name in ("jax", "jaxlib"):
        assert str(core[name].specifier) == f"=={pinned(name)}", core[name]
    assert not [name for name in core if name.startswith("onednn")], sorted(core)

    # a new environment with the wheel alone, which sees this one's packages through a .pth file (whose
    # own .pth files, such as the editable install of the repository's diffusion_jax, are not read)
    new = tmp_path / "new"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", new], check=True)
    new_python = new / "bin" / "python"
    site_packages = subprocess.run(
        [new_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    pathlib.Path(site_packages, "test_packaging.pth").write_text("".join(f"{path}\n" for path in ours))
    installed = pip("--python", new_python, "install", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    imported = subprocess.run([new_python, "-c", IMPORT_EACH, *modules], cwd=tmp_path, capture_output=True,
                              env=dict(scripts.environment(), PYTHONPATH=""), text=True, timeout=600,
                              check=False)
    assert imported.returncode == 0, imported.stderr[-3000:]
    files = json.loads(imported.stdout.splitlines()[-1])
    outside = {m: f for m, f in files.items() if not f.startswith(site_packages + os.sep)}
    assert not outside, f"imported from outside the new environment's {site_packages}: {outside}"


@pytest.mark.parametrize("extra, accelerator", [
    ("tpu", {"libtpu": None}),
    ("cuda12", {"jax-cuda12-plugin": pinned("jax"), "jax-cuda12-pjrt": pinned("jax")}),
], ids=["tpu", "cuda12"])
def test_an_accelerator_extra_brings_the_pinned_jax_and_its_plugin_without_onednn(source, tmp_path, extra,
                                                                                     accelerator):
    # what pip would install in an empty environment, from the wheels' metadata alone: PEP 658 files, or
    # (fast-deps) HTTP range requests where the index has none, rather than the CUDA wheels' 3.5 GB
    report = tmp_path / "report.json"
    resolved = pip("install", "--quiet", "--dry-run", "--ignore-installed", "--no-build-isolation",
                   "--use-feature=fast-deps", "--report", report, f"{source}[{extra}]", cwd=tmp_path)
    assert resolved.returncode == 0, (f"pip could not resolve diffusion-jax[{extra}]; this test reads the "
                                      f"package index (PyPI): is it reachable?\n{resolved.stderr[-3000:]}")
    versions = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert {"jax", "jaxlib", *accelerator} <= versions.keys(), sorted(versions)
    assert (versions["jax"], versions["jaxlib"]) == (pinned("jax"), pinned("jaxlib"))
    for name, version in accelerator.items():
        assert version in (None, versions[name]), (name, versions[name])
    assert not [name for name in versions if name.startswith("onednn")], sorted(versions)


def test_without_a_compiler_the_package_installs_and_trains_on_xla_convolutions(source, tmp_path):
    # a PATH with Python alone (no gcc, g++, cc, c++ or clang): the oneDNN headers and jax are in this
    # environment, so only the missing compiler keeps setup.py from building the library
    path = tmp_path / "bin"
    path.mkdir()
    (path / "python").symlink_to(sys.executable)
    environment = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")} | {"PATH": str(path)}
    site = tmp_path / "site"
    installed = pip("install", "--verbose", "--no-deps", "--no-build-isolation", "--target", site, source,
                    env=environment, cwd=tmp_path)
    output = installed.stdout + installed.stderr
    assert installed.returncode == 0, output[-3000:]
    said = [line for line in output.splitlines() if XLA_LINE in line]
    assert len(said) == 1 and "cannot build csrc/onednn_conv.cc" in said[0], said
    assert not list(site.rglob("_onednn_conv*.so"))

    shutil.rmtree(source / "diffusion_jax")  # the copy's train.py and config import the installed package
    trained = python(tmp_path, source / "train.py", f"--config={source}/configs/quickstart.py",
                     f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=2",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=2",
                     "--config.sample.every=0", "--config.eval.num_samples=0", PYTHONPATH=str(site))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "step 2/2" in trained.stdout, trained.stdout[-3000:]
    checked = python(tmp_path, "-c", "import diffusion_jax; from diffusion_jax.models import onednn; "
                     "print(diffusion_jax.__file__, onednn.onednn_available())", PYTHONPATH=str(site))
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.split() == [str(site / "diffusion_jax" / "__init__.py"), "False"]

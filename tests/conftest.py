"""Fixtures shared by the test modules."""

import subprocess

import pytest
import scripts
import triton  # noqa: F401  (before TensorFlow: see below)

from diffusion_jax import xla_flags

# torch 2.14.1's wheel brings triton, which diffusers loads through torch._dynamo; its
# libtriton crashes the process (segfault) when it loads after TensorFlow's libraries, and
# the parity tests need both in one process. Loaded first, both work.

xla_flags.set_defaults()  # the entry points' XLA flags for the tests in this process, before JAX starts

QUICKSTART_STEPS = 300
pytest_plugins = ["gcs_emulator"]  # the bucket fixture: a gs:// bucket on this machine

# make test runs two pytest-xdist workers (--dist loadgroup); the tests of each expensive shared
# fixture go to one worker, so that it is built once. sample.py --fid needs both of the first two.
ONE_WORKER = {"quickstart_workdir": "quickstart", "fid_files": "quickstart", "reference": "train-reference",
              "extractor": "fid-extractor", "conditional_workdir": "conditional"}


TIERS = ("integration", "slow", "parity")  # pyproject.toml's markers; a test of none is a unit test
# fixtures that start processes (a training run, the GCS emulator, pip): their tests are integration tests
PROCESS_FIXTURES = ("quickstart_workdir", "conditional_workdir", "reference", "bucket", "libtpu")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    for item in items:
        if any(name in PROCESS_FIXTURES for name in item.fixturenames):
            item.add_marker(pytest.mark.integration)
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)
        groups = sorted({ONE_WORKER[name] for name in item.fixturenames if name in ONE_WORKER})
        if len(groups) > 1:
            raise ValueError(f"{item.nodeid} needs the fixtures of the groups {groups}: make them one in "
                             "ONE_WORKER")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(scope="session", autouse=True)
def tests_in_their_worker_groups(request):
    """Under --dist loadgroup, fail (before any fixture is built) if pytest-xdist did not group the tests."""
    if not getattr(request.config.option, "loadgroup", False):
        return
    for item in request.session.items:
        group = next((mark.args[0] for mark in item.iter_markers("xdist_group")), None)
        if group is not None and not item.nodeid.endswith(f"@{group}"):
            pytest.fail(f"pytest-xdist did not put {item.nodeid} in its group {group!r}, so the group's "
                        "fixtures would be built on every worker: pytest 9.2 with pytest-xdist 3.8 does that "
                        "(pytest-dev/pytest-xdist#1386); install requirements-test.txt")


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """In the unit tier (``-m unit``, make test-fast) a test that starts a process fails, naming the
    mark it needs: the tier stays quick and in-process however the tests change."""
    if request.node.get_closest_marker("unit") and "unit" in (request.config.option.markexpr or ""):
        def refuse(self, args, *rest, **options):
            pytest.fail(f"{request.node.nodeid} starts a process ({args!r}): mark it "
                        "@pytest.mark.integration")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def quickstart_workdir(tmp_path_factory):
    """A workdir of configs/quickstart.py trained for 300 steps (~2 minutes), for sample.py and evaluation."""
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    scripts.run("train.py", f"--config={scripts.ROOT}/configs/quickstart.py", f"--workdir={workdir}",
                f"--config.train.num_steps={QUICKSTART_STEPS}", "--config.train.checkpoint_every=300",
                "--config.sample.every=0", "--config.eval.num_samples=0")
    return workdir

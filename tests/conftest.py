"""Fixtures shared by the test modules."""

import pytest
import triton  # noqa: F401  (before TensorFlow: see below)

import scripts

# torch 2.14.1's wheel brings triton, which diffusers loads through torch._dynamo; its
# libtriton crashes the process (segfault) when it loads after TensorFlow's libraries, and
# the parity tests need both in one process. Loaded first, both work.

QUICKSTART_STEPS = 300

# make test runs two pytest-xdist workers (--dist loadgroup); the tests of each expensive shared
# fixture go to one worker, so that it is built once. sample.py --fid needs both of the first two.
ONE_WORKER = {"quickstart_workdir": "quickstart", "fid_files": "quickstart", "reference": "train-reference",
              "extractor": "fid-extractor"}


def pytest_collection_modifyitems(items):
    for item in items:
        groups = sorted({ONE_WORKER[name] for name in item.fixturenames if name in ONE_WORKER})
        if len(groups) > 1:
            raise ValueError(f"{item.nodeid} needs the fixtures of the groups {groups}: make them one in ONE_WORKER")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(scope="session")
def quickstart_workdir(tmp_path_factory):
    """A workdir of configs/quickstart.py trained for 300 steps (~2 minutes), for sample.py and evaluation."""
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    scripts.run("train.py", f"--config={scripts.ROOT}/configs/quickstart.py", f"--workdir={workdir}",
                f"--config.train.num_steps={QUICKSTART_STEPS}", "--config.train.checkpoint_every=300",
                "--config.sample.every=0", "--config.eval.num_samples=0")
    return workdir

"""docs/pods.md followed on one CPU host, as far as it runs without Google Cloud, GPUs or Slurm.

The recipe's install command (``INSTALL``, as every worker runs it) makes a clone with a
fresh ``.venv`` from the repository; the clone's own Python then runs the dry run, a short
training run and its resume as two processes over 127.0.0.1 (``--coordinator_address`` in
place of the pod's discovery), on a workdir in the emulator's ``gs://`` bucket. The gcloud,
sbatch and srun lines are checked by ``bash -n`` only.
"""

import os
import pathlib
import re
import subprocess

import gcs_emulator
import pytest
import scripts
from gcs_emulator import objects

pytestmark = pytest.mark.integration

DOC = pathlib.Path(scripts.ROOT, "docs", "pods.md")
SBATCH = pathlib.Path(scripts.ROOT, "examples", "slurm.sbatch")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def test_every_command_of_the_recipe_and_the_sbatch_script_parses():
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) >= 5 and sum("gcloud compute tpus" in block for block in blocks) >= 4
    for block in [*blocks, SBATCH.read_text()]:
        parsed = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert parsed.returncode == 0, f"{parsed.stderr}\n{block}"
    assert "srun" in SBATCH.read_text() and "train.py --config=configs/cifar10.py" in SBATCH.read_text()


def requirement(name: str) -> str:
    """``name==VERSION`` as requirements-test.txt pins it."""
    text = pathlib.Path(scripts.ROOT, "requirements-test.txt").read_text()
    return re.search(rf"^{re.escape(name)}==\S+", text, re.M).group(0)


@pytest.fixture
def installed(tmp_path):
    """The clone and its Python that the recipe's INSTALL makes in a HOME of its own, from a git
    repository of the work tree's files."""
    origin = scripts.copy_repository(tmp_path / "origin")
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    for command in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *command], cwd=origin, check=True, capture_output=True)
    home = tmp_path / "home"
    home.mkdir()
    install = re.search(r"^INSTALL='(.*?)'$", DOC.read_text(), re.S | re.M).group(1)
    real_home = pathlib.Path.home()
    # pip's cache and pyenv's Pythons (python3.11 may be a pyenv shim) stay where they are
    env = dict(os.environ, HOME=str(home), PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR",
                                                                      str(real_home / ".cache" / "pip")))
    if (real_home / ".pyenv").is_dir():
        env.setdefault("PYENV_ROOT", str(real_home / ".pyenv"))
    # as `gcloud ... --worker=all --command="REPO=$REPO; $INSTALL"` runs it on each worker
    done = subprocess.run(["bash", "-c", f"REPO={origin}; {install}"], env=env, cwd=home, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    clone = home / "diffusion-jax"
    python = clone / ".venv" / "bin" / "python"
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    assert "libtpu==" in listed and "diffusion-jax==" in listed, listed
    # gs:// through gcsfs, for the emulator only: on a pod, TensorFlow's gfile reaches the bucket
    added = subprocess.run([python, "-m", "pip", "install", "-q", requirement("gcsfs")], env=env,
                           capture_output=True, text=True, timeout=600)
    assert added.returncode == 0, added.stderr[-3000:]
    return clone, python


def test_the_recipe_installs_a_clone_that_checks_trains_and_resumes_two_processes_on_gs(installed, bucket):
    clone, python = installed
    train = [f"--config={clone}/tests/tiny_config.py", "--workdir=gs://bucket/run",
             "--config.train.num_steps=2", "--config.train.checkpoint_every=2"]

    def run(*args):
        return scripts.run_distributed("train.py", *train, *args, python=python, root=clone, cwd=clone,
                                       **gcs_emulator.environment(bucket))

    checked = run("--dry_run")
    for i, (out, _) in enumerate(checked):
        assert f"backend cpu, 4 device(s) (cpu), 2 on this host; process {i} of 2" in out, out
    out = checked[0][0]
    for line in ("  train.num_steps = 2", "  model.ch_mult = [1, 2]",
                 "data: digits split train: 1500 images, 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); each of "
                 "the 2 process(es) reads a share, 4 images a step",
                 "workdir: gs://bucket/run, writable and seen by all 2 process(es); no checkpoint: the run "
                 "starts at step 1",
                 "dry run complete: nothing was trained or saved"):
        assert line in out.splitlines(), out
    assert re.search(r"^network: [\d,]+ parameters; 2 steps of 8 images over 4 device\(s\)$", out, re.M), out
    assert "config:" not in checked[1][0]  # the report comes from process 0 alone
    assert objects(bucket) == []  # the checks' probe files are gone; nothing else was written

    run()
    assert "run/checkpoints/2/commit_success.txt" in objects(bucket)
    resumed = run("--config.train.num_steps=4")
    assert "resumed from the checkpoint of step 2 in gs://bucket/run" in resumed[0][0], resumed[0]
    assert "run/checkpoints/4/commit_success.txt" in objects(bucket)
    out = run("--dry_run")[0][0]
    assert "checkpoints of steps 2, 4: the run resumes from the newest readable one" in out, out

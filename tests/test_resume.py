"""Training survives kill -9: each training rule, killed mid-run and re-run through snakemake, resumes
where it stopped and ends with the same weights as an uninterrupted run (CPU, deterministic)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_workflow import SNAKEFILE, snakemake, tiny_config, write_config

# rule → (overrides making the training last long enough to kill, its output under results/)
TRAININGS = {
    "train_diffusion": ({"diffusion": {"epochs": 40}}, "diffusion/*/diffusion"),
}


def tensors(checkpoint: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint, by path (curves with wall-clock seconds are not weights)."""
    found = {}
    for name, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            found[prefix + name] = value
        elif isinstance(value, dict):
            found.update(tensors(value, f"{prefix}{name}."))
    return found


# Through snakemake, once: the diffusion model, killed by SIGKILL and re-run by snakemake (staging, the rule's
# resume state outside its outputs, --rerun-incomplete). Each trainer's resume itself is unit-tested with a kill
# in tests/test_<trainer>.py (test_a_killed_run_resumes_to_the_same_weights; the detector's in
# test_training_is_deterministic_and_resumes), which is where the detector's end-to-end run went (issue 16).
@pytest.mark.workflow
@pytest.mark.parametrize("rule", list(TRAININGS))
def test_a_training_killed_by_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, rule):
    overrides, output = TRAININGS[rule]
    config = tiny_config()
    config["experiments"] = {"only": overrides}
    write_config(tmp_path, config)
    results = tmp_path / "results"
    snakemake(tmp_path, "--cores", "1", "--until", rule)
    (model,) = results.glob(f"{output}.pt")
    uninterrupted = tensors(torch.load(model, weights_only=True))
    for path in model.parent.iterdir():  # forget the finished run: outputs and log
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (log,) = results.glob(f"logs/{rule}/*.log")
    log.unlink()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MEDMEM_RESUME_INTERVAL_SECONDS": "0"}  # a resume state after every epoch
    job = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path),
                            "--cores", "1", "--until", rule], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not [p for p in model.parent.glob("*.last.pt") if not p.name.startswith(".")]:
        assert job.poll() is None and time.monotonic() < deadline, "the training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))  # somewhere after the first resume state
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not model.exists(), "the training finished before the kill: give it more epochs"

    snakemake(tmp_path, "--unlock")
    snakemake(tmp_path, "--cores", "1", "--until", rule, env=env)
    assert "resuming from" in log.read_text()  # resumed, not restarted
    resumed = tensors(torch.load(model, weights_only=True))
    assert resumed.keys() == uninterrupted.keys()
    for name, weights in uninterrupted.items():
        assert torch.equal(resumed[name], weights), name
    # The resume state goes once the output is written. (A write cut by the kill may leave a hidden
    # ".<name>.*.tmp.last.pt" temp file beside it; it is never read.)
    assert not [p for p in model.parent.glob("*.last.pt") if not p.name.startswith(".")]

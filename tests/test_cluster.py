"""The profiles as users run them: dry runs that show each job's resources, and the tiny workflow submitted
through workflow/profiles/slurm to a real single-node SLURM (tests/cluster/start_slurm.sh) with two fake GPUs.

The SLURM test needs root and Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them
when it runs as root); elsewhere it skips, or fails where MEDMEM_REQUIRE_SLURM=1 (CI) says it must run.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pins import rule_declarations
from test_workflow import SNAKEFILE, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "workflow" / "profiles"
CLUSTER = Path(__file__).resolve().parent / "cluster"
GPU_RULES = {name for name, rule in rule_declarations().items() if rule["gpu"]}


def local_rules() -> set[str]:
    """The rules the Snakefile's `localrules:` runs beside snakemake instead of submitting."""
    (line,) = re.findall(r"(?m)^localrules: (.+)$", SNAKEFILE.read_text())
    return {name.strip() for name in line.split(",")} - {"all"}


def missing_slurm() -> str | None:
    """Why SLURM cannot be started here, or None."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return ("snakemake-executor-plugin-slurm is not installed "
                "(pip install -r workflow/profiles/slurm/requirements.txt)")
    if os.geteuid() != 0:
        return "slurmd and munged must run as root"
    missing = [tool for tool in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not found: "
                "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge")
    return None


def skip_or_fail(reason: str):
    if os.environ.get("MEDMEM_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEDMEM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def dry_run_jobs(workdir: Path, *args: str) -> list[tuple[str, str]]:
    """(rule, resources line) of every job that `snakemake -n` prints."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "-n", *args],
                            capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    blocks = re.split(r"\n(?:local)?rule (\w+):\n", result.stdout + result.stderr)[1:]
    jobs = []
    for rule, body in zip(blocks[0::2], blocks[1::2]):
        resources = re.search(r"^\s+resources: (.*)$", body, re.MULTILINE)
        jobs.append((rule, resources[1] if resources else ""))
    return jobs


def resource_values(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split(", "))


def test_the_default_profile_dry_run_shows_each_jobs_resources(tmp_path):
    write_config(tmp_path, tiny_config())
    jobs = dry_run_jobs(tmp_path)
    assert len(jobs) > 20
    for rule, line in jobs:
        if rule == "all":
            continue
        resources = resource_values(line)
        assert "mem_mb" in resources, (rule, line)
        assert (resources.get("gpu") == "1") == (rule in GPU_RULES), (rule, line)


def test_the_slurm_profile_sizes_every_rule_and_gives_torch_the_cores_it_asks_for():
    """Every submitted rule has its own entry, so that `--default-resources slurm_account=...` on the command
    line (which replaces the profile's default-resources whole) leaves every job's size as the profile says;
    the local rules (bookkeeping) have none."""
    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    sizes = profile["set-resources"]
    submitted = set(rule_declarations()) - local_rules()
    assert local_rules() == {"split", "train_subset", "canaries", "report"}
    assert set(sizes) == submitted, set(sizes) ^ submitted
    for rule, resources in sizes.items():
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(resources), rule
        assert "gpu" not in resources and "gpu_model" not in resources, f"{rule}: GPUs come from the rule's gpu=1"
        assert profile["set-threads"].get(rule, 1) == resources["cpus_per_task"], rule


def test_the_slurm_profile_dry_run_shows_runtime_memory_cores_and_gpus(tmp_path):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        skip_or_fail("snakemake-executor-plugin-slurm is not installed")
    write_config(tmp_path, tiny_config())
    jobs = dry_run_jobs(tmp_path, "--workflow-profile", str(PROFILES / "slurm"))
    rules = {rule for rule, _ in jobs}
    assert {"train_autoencoder", "train_diffusion", "sample", "train_detector", "embed_split", "embed_set"} <= rules
    assert {"ingest", "split", "similarity", "assess", "report"} <= rules
    for rule, line in jobs:
        if rule == "all":
            continue
        resources = resource_values(line)
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(resources), (rule, line)
        assert (resources.get("gpu") == "1") == (rule in GPU_RULES), (rule, line)
    resources = dict(jobs)
    assert resource_values(resources["train_diffusion"])["runtime"] == "720"  # set-resources reached the job


def scontrol_jobs(env: dict[str, str]) -> list[dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge keeps finished ones for an hour), as key → value."""
    output = subprocess.run(["scontrol", "show", "job", "--details", "--oneliner"], capture_output=True, text=True,
                            env=env, check=True, timeout=60).stdout
    jobs = []
    for line in output.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        fields["Rule"] = re.sub(r"_wildcards_.*$", "", fields.get("Comment", "")).removeprefix("rule_")
        jobs.append(fields)
    return jobs


def task_gpus(state_dir: Path) -> dict[str, str]:
    """job id → CUDA_VISIBLE_DEVICES of its srun step (the rule itself), as the task prolog recorded it."""
    gpus = {}
    for line in (state_dir / "log" / "task_gpus.log").read_text().splitlines():
        fields = dict(item.split("=", 1) for item in line.split())
        if fields["step"] == "0":
            gpus[fields["job"]] = fields["CUDA_VISIBLE_DEVICES"]
    return gpus


@pytest.fixture
def slurm(tmp_path_factory):
    """A running single-node SLURM; yields (state folder, environment for its clients); stops every daemon."""
    reason = missing_slurm()
    if reason:
        skip_or_fail(reason)
    state_dir = tmp_path_factory.mktemp("slurm")
    pids = {}
    try:
        started = subprocess.run(["bash", str(CLUSTER / "start_slurm.sh"), str(state_dir)], capture_output=True,
                                 text=True, timeout=120)
        pids = {path.stem: int(path.read_text()) for path in (state_dir / "run").glob("*.pid")}
        assert started.returncode == 0, started.stdout + started.stderr
        assert set(pids) == {"munged", "slurmctld", "slurmd"}, pids
        env = environment(SLURM_CONF=str(state_dir / "etc" / "slurm.conf"))
        env["PATH"] = f"{state_dir / 'bin'}{os.pathsep}{env['PATH']}"  # its srun finds this cluster's config
        yield state_dir, env
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER / "stop_slurm.sh"), str(state_dir)], capture_output=True,
                                 text=True, timeout=60)
        for daemon, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{daemon} ({pid}) still runs: {stopped.stderr}"
        assert stopped.returncode == 0, stopped.stderr


@pytest.mark.workflow
def test_the_tiny_workflow_runs_on_slurm_with_gpus_for_gpu_rules_only(slurm, tmp_path):
    state_dir, env = slurm
    config = tiny_config()
    config["experiments"] = {"baseline": {}}
    write_config(tmp_path, config)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path),
         "--workflow-profile", str(PROFILES / "slurm"),
         # This cluster has no accounting database: sacct cannot answer, squeue can (MinJobAge=3600).
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
         "--slurm-logdir", str(tmp_path / "slurm_logs"), "--slurm-keep-successful-logs",
         # One torch thread per job on a 2-core test machine (sbatch still asks for the profile's
         # cpus_per_task, mem_mb, runtime). Most of a job's time here is Snakemake's status polling, which
         # backs off by 10 s per check that finds nothing finished: parallel jobs keep it short.
         "--jobs", "4", "--max-threads", "1"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    print(f"tiny workflow on SLURM: {elapsed:.0f} s")

    results = tmp_path / "results"
    memorization = pd.read_csv(results / "experiments" / "baseline" / "memorization.csv").iloc[0]
    assert memorization["n_train"] == 21 and memorization["n_holdout"] == 7 and memorization["n_synthetic"] == 12
    assert list(pd.read_csv(results / "report" / "summary.csv")["experiment"]) == ["baseline"]

    jobs = [job for job in scontrol_jobs(env) if job["Rule"]]
    gpus = task_gpus(state_dir)
    assert {job["JobState"] for job in jobs} == {"COMPLETED"}
    rules = {job["Rule"] for job in jobs}
    assert {"train_autoencoder", "train_diffusion", "sample", "train_detector", "embed_split", "embed_set"} <= rules
    assert {"ingest", "plant_controls", "similarity", "baselines", "assess", "quality", "release"} <= rules
    assert not rules & local_rules(), rules & local_rules()  # bookkeeping ran beside snakemake
    for job in jobs:
        on_gpu = job["Rule"] in GPU_RULES
        # Asked for (scontrol's JOB_GRES) and given (the rule's environment) one GPU, or none.
        assert job["JOB_GRES"] == ("gpu:1" if on_gpu else "(null)"), job
        assert (gpus[job["JobId"]] != "unset") == on_gpu, (job["Rule"], gpus[job["JobId"]])
    # The profile's per-rule sizes reached sbatch.
    diffusion = next(job for job in jobs if job["Rule"] == "train_diffusion")
    assert (diffusion["TimeLimit"], diffusion["NumCPUs"], diffusion["MinMemoryNode"]) == ("12:00:00", "4", "16000M")
    ingest = next(job for job in jobs if job["Rule"] == "ingest")
    assert (ingest["TimeLimit"], ingest["NumCPUs"], ingest["MinMemoryNode"]) == ("01:00:00", "1", "8000M")

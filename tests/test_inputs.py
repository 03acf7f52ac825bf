"""Through snakemake: the user's data tracked by content, and one run at a time per results folder.

A replaced, added or removed input file re-runs ingest (a folder of volumes, a manifest's files, a DICOM
series folder, the synthetic folder's ingest_synthetic); a touch does not. A second run on a results folder
is refused before its first job; the next run removes a killed run's temporaries and nothing else.
"""

import locale
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from procedural_cohort import ellipsoid_volumes
from test_results_folder import hold_lock, killed_during_atomic_writes
from test_workflow import ROOT, SNAKEFILE, write_config

from medmem import artefacts, run_lock, staging

AFFINE = np.diag([8.0, 8.0, 8.0, 1.0])


def write_dicom_series(folder: Path, volume: np.ndarray) -> None:
    """(i, j, k) ``volume`` as one DICOM file per slice k, one series."""
    saved = locale.setlocale(locale.LC_ALL)  # GDCM leaves the process locale at "C" (see conftest.py)
    try:
        write_slices(folder, volume)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_slices(folder: Path, volume: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the files have no suffix to choose it by
    uid = "1.2.826.0.1.3680043.2.1125.7.1"
    series = sitk.GetImageFromArray(np.round(volume * 1000).astype(np.int16).transpose(2, 1, 0))
    series.SetSpacing((8.0, 8.0, 8.0))
    for k in range(volume.shape[2]):
        image = series[:, :, k]
        for tag, value in [("0020|000d", f"{uid}.0"), ("0020|000e", uid), ("0020|0011", "1"), ("0008|0060", "MR"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"0\\0\\{8.0 * k}"),
                           ("0020|0013", str(k + 1)), ("0018|0050", "8")]:
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}"))
        writer.Execute(image)


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def planned_ingests(workdir: Path, targets: list[str]) -> dict[str, str]:
    """Experiment source → the reason of each ingest job that `snakemake -n` plans for ``targets``."""
    result = snakemake(workdir, "-n", *targets)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = result.stdout + result.stderr
    jobs = {}
    for block in re.findall(r"\nrule (?:ingest|ingest_synthetic):\n((?:    .*\n)+)", text):
        key = re.search(r"wildcards: \w+=(\w+)", block)[1]
        jobs[SOURCES[key]] = re.search(r"reason: (.*)", block)[1]
    assert jobs or "Nothing to be done" in text, text[-4000:]
    return jobs


SOURCES: dict[str, str] = {}  # ingest key → the source it reads (folder, manifest, dicom, synthetic)


def job_counts(output: str) -> dict[str, int]:
    """Rule → job count from the job-stats table that snakemake prints before its first job."""
    table = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table.split("\n\n")[0], re.MULTILINE)}


def changed(changes: list[tuple]) -> None:
    """Apply the (change, undo) pairs."""
    for change, _ in changes:
        change()


def undone(changes: list[tuple]) -> None:
    for _, undo in changes:
        undo()


def replace(path: Path, content: bytes) -> tuple:
    original = path.read_bytes()
    return lambda: path.write_bytes(content), lambda: path.write_bytes(original)


def add(path: Path, content: bytes) -> tuple:
    return lambda: path.write_bytes(content), lambda: path.unlink()


def remove(path: Path) -> tuple:
    original = path.read_bytes()
    return lambda: path.unlink(), lambda: path.write_bytes(original)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Four sources of volumes (a folder, a manifest's files, a DICOM series folder, a synthetic folder)
    ingested by one snakemake run, which first finds a killed run's temporaries; then, with every source's
    content replaced, a second run attempted while another run holds the lock (and the changes undone)."""
    from medmem.config import make_plan

    workdir = tmp_path_factory.mktemp("inputs")
    volumes = ellipsoid_volumes(9, 8, seed=3)
    for index in range(3):
        artefacts.save_nifti(workdir / "cohort" / f"p{index}.nii.gz", volumes[index], AFFINE)
        artefacts.save_nifti(workdir / "listed" / f"m{index}.nii.gz", volumes[3 + index], AFFINE)
    (workdir / "manifest.csv").write_text("patient_id,path\n" + "".join(f"m{i},listed/m{i}.nii.gz\n" for i in range(3)))
    write_dicom_series(workdir / "dicom" / "patA", volumes[6])
    for index in range(2):
        artefacts.save_nifti(workdir / "synthetic" / f"s{index}.nii.gz", volumes[7 + index], AFFINE)
    artefacts.save_nifti(workdir / "spare.nii.gz", volumes[0] * 0.5, AFFINE)

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["data"].update(shape=[8, 8, 8], spacing=[8.0, 8.0, 8.0], duplicates={"threshold": 0.99,
                                                                                "across_patients": "warn"})
    folder = {**config["data"]["folder"], "path": str(workdir / "cohort")}
    config["experiments"] = {
        "folder": {"data": {"source": "folder", "folder": folder},
                   "synthetic": {"source": "folder", "folder": str(workdir / "synthetic")}},
        "manifest": {"data": {"source": "manifest", "manifest": str(workdir / "manifest.csv")}},
        "dicom": {"data": {"source": "folder", "folder": {**folder, "path": str(workdir / "dicom")}}},
    }
    write_config(workdir, config)
    keys = make_plan(config, ROOT / "workflow" / "schemas" / "config.schema.yaml").experiments
    SOURCES.update({keys["folder"]["ingest"]: "folder", keys["manifest"]["ingest"]: "manifest",
                    keys["dicom"]["ingest"]: "dicom", keys["folder"]["ingest_synthetic"]: "synthetic"})
    targets = [f"results/ingest/{keys[name]['ingest']}/cases.csv" for name in ("folder", "manifest", "dicom")]
    targets.append(f"results/ingest_synthetic/{keys['folder']['ingest_synthetic']}/manifest.csv")

    results = workdir / "results"
    ingest_folder = results / "ingest" / keys["folder"]["ingest"]
    killed_during_atomic_writes((ingest_folder / "volumes", True))
    resume_state = results / "detector" / "0123456789" / "detector.last.pt"
    resume_state.parent.mkdir(parents=True)
    resume_state.write_bytes(b"resume")
    run = snakemake(workdir, "--cores", "1", *targets)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lock_record_after_run = (results / run_lock.LOCK_FILE).read_text()
    outputs = {path: path.stat().st_mtime_ns for path in results.glob("ingest*/*/*")}

    slices = sorted((workdir / "dicom" / "patA").iterdir())
    replaced = [replace(workdir / "cohort" / "p1.nii.gz", (workdir / "spare.nii.gz").read_bytes()),
                replace(workdir / "listed" / "m1.nii.gz", (workdir / "spare.nii.gz").read_bytes()),
                replace(slices[1], slices[2].read_bytes()),
                replace(workdir / "synthetic" / "s1.nii.gz", (workdir / "spare.nii.gz").read_bytes())]
    # The staging folder of the other run's ingest, named as atomic_directory names it.
    prefix, suffix = staging.affixes(ingest_folder / "volumes", keep_suffixes=False)
    staged = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=ingest_folder))
    changed(replaced)
    holder = hold_lock(results)
    try:
        refused = snakemake(workdir, "--cores", "1", *targets)
    finally:
        holder.kill()
        holder.wait()
        undone(replaced)
    return {"workdir": workdir, "targets": targets, "run": run, "resume_state": resume_state, "stale": ingest_folder,
            "refused": refused, "outputs": outputs, "staged": staged, "lock_record_after_run": lock_record_after_run}


@pytest.mark.workflow
def test_a_second_run_on_a_results_folder_is_refused_before_any_job(ingested):
    refused = ingested["refused"]
    message = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0
    assert f"results folder {ingested['workdir'] / 'results'} is in use by another run: pid" in message
    assert "checkout /elsewhere/medmem" in message and "Traceback" not in message
    # Refused before its first job: no job started or wrote anything, and the other run's staging stays.
    assert "rule ingest" not in message and "Finished jobid" not in message
    assert {path: path.stat().st_mtime_ns for path in ingested["outputs"]} == ingested["outputs"]
    assert ingested["staged"].is_dir()


@pytest.mark.workflow
def test_the_next_run_removes_a_killed_runs_staging_and_keeps_resume_states(ingested):
    log = ingested["run"].stdout + ingested["run"].stderr
    removed = re.findall(r"Removed the temporary output of a killed run: (\S+)", log)
    assert len(removed) == 1 and Path(removed[0]).name.startswith(".volumes.")
    assert not any(staging.is_staging(p.name) for p in ingested["stale"].iterdir() if p != ingested["staged"])
    assert ingested["resume_state"].read_bytes() == b"resume"
    # The run has ended: its lock with it, and the lock file names nobody.
    assert ingested["lock_record_after_run"] == ""


@pytest.mark.workflow
def test_ingest_reruns_when_an_input_file_changes_and_not_when_it_is_touched(ingested):
    workdir, targets = ingested["workdir"], ingested["targets"]
    # A file's content replaced in each source (same names): the refused run had planned every ingest job.
    assert job_counts(ingested["refused"].stdout + ingested["refused"].stderr) == {
        "ingest": 3, "ingest_synthetic": 1, "total": 4}

    def planned_after(changes: list[tuple]) -> dict[str, str]:
        changed(changes)
        try:
            return planned_ingests(workdir, targets)
        finally:
            undone(changes)

    spare = (workdir / "spare.nii.gz").read_bytes()
    slices = sorted((workdir / "dicom" / "patA").iterdir())
    manifest = (workdir / "manifest.csv").read_text()
    added = planned_after([
        add(workdir / "cohort" / "p3.nii.gz", spare),
        (lambda: (workdir / "manifest.csv").write_text(manifest + "m3,spare.nii.gz\n"),
         lambda: (workdir / "manifest.csv").write_text(manifest)),
        add(workdir / "dicom" / "patA" / "IM0099", slices[0].read_bytes()),
        add(workdir / "synthetic" / "s2.nii.gz", spare)])
    assert set(added) == {"folder", "manifest", "dicom", "synthetic"}
    assert all(reason.startswith("Params have changed since last execution") for reason in added.values())
    removed = planned_after([
        remove(workdir / "cohort" / "p2.nii.gz"),
        remove(workdir / "listed" / "m2.nii.gz"),  # still listed: ingest will say it is missing
        remove(slices[-1]),
        remove(workdir / "synthetic" / "s0.nii.gz")])
    assert set(removed) == {"folder", "manifest", "dicom", "synthetic"}

    # Every change undone (the files are back, with new times), then every file and folder touched, and
    # while another run holds the lock: a dry run plans nothing.
    inputs = [workdir / name for name in ("cohort", "listed", "dicom", "synthetic", "manifest.csv")]
    later = time.time() + 100
    for path in [*inputs, *(f for folder in inputs if folder.is_dir() for f in folder.rglob("*"))]:
        os.utime(path, (later, later))
    holder = hold_lock(workdir / "results")
    try:
        assert planned_ingests(workdir, targets) == {}
    finally:
        holder.kill()
        holder.wait()

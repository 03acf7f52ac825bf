"""The workflow as a user runs it: dry-run plans, and a tiny end-to-end `snakemake` run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
# A run on this 2-core CPU machine as the README advises: two GPU-rule jobs side by side (the default profile
# allows one, for a real GPU); serialized, the end-to-end tests took about 2 minutes longer.
CPU_RUN = ("--cores", "2", "--resources", "gpu=2")


def tiny_config() -> dict:
    """The demo config shrunk to run end to end in a couple of minutes on 2 CPU cores."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["data"]["shape"] = [16, 16, 16]
    config["data"]["spacing"] = [8.0, 8.0, 8.0]
    config["data"]["phantom"]["n_patients"] = 28  # 21 train (enough for a 95th percentile), 7 holdout
    config["split"].update(min_holdout=5, holdout_fraction=0.25)
    config["autoencoder"].update(epochs=3, adversarial_warmup_epochs=2, batch_size=4)
    config["diffusion"].update(channels=[16, 32], norm_num_groups=8, epochs=4, batch_size=8)
    config["sample"].update(steps=5, n_samples=12)
    config["detector"].update(channels=[8, 16], epochs=4, batch_size=8)
    # 7 held-out patients calibrate a 15% false-positive rate at best (the calibrated threshold needs 1 / rate - 1).
    config["assess"].update(montage_pairs=3, percentile=85.0)
    # The second experiment trains longer on data with two canaries (each seen 4 times per epoch).
    config["experiments"] = {"baseline": {}, "canaries": {"diffusion": {"epochs": 8},
                                                          "canaries": {"n_patients": 2, "copies": 4}}}
    return config


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule → job count of a dry run, read from Snakemake's job-stats table."""
    output = snakemake(workdir, "-n", *args)
    text = output.stdout + output.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        jobs[match.group(1)] = int(match.group(2))
    return jobs


def test_default_plan_shares_upstream_stages(tmp_path):
    write_config(tmp_path, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    jobs = planned_jobs(tmp_path)
    # Two experiments, differing only in the diffusion model's data (canaries) and epochs, share ingest, split,
    # autoencoder, detector and the detector's train/holdout embeddings.
    # The planted controls are shared too, and so are the real volumes and controls decoded through the shared
    # autoencoder (similarity.reference: auto is decoded for an LDM) and their embedding; the controls as planted
    # are not embedded, since nothing compares them.
    assert jobs == {"all": 1, "ingest": 1, "split": 1, "canaries": 1, "plant_controls": 1, "train_autoencoder": 1,
                    "train_detector": 1, "train_diffusion": 2, "sample": 2, "decode": 1, "embed_split": 2, "embed_set": 3, "similarity": 2,
                    "baselines": 2, "baselines_controls": 1, "screen": 2, "assess": 2, "quality": 2, "release": 2,
                    "report": 1, "total": 31}


def test_planning_imports_no_torch_monai_faiss_or_simpleitk(tmp_path):
    """`snakemake -n` validates every experiment (config.make_plan builds each stage's Settings) without the
    heavy libraries, so a plan on a login node is quick and small; the modules it loaded are read at exit."""
    write_config(tmp_path, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    loaded = tmp_path / "modules.txt"
    program = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: open({str(loaded)!r}, 'w').write('\\n'.join(sorted(sys.modules))))\n"
        f"sys.argv = ['snakemake', '-s', {str(SNAKEFILE)!r}, '-d', {str(tmp_path)!r}, '-n']\n"
        "runpy.run_module('snakemake', run_name='__main__', alter_sys=True)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_diffusion" in result.stdout + result.stderr  # it planned the demo's jobs
    modules = set(loaded.read_text().split())
    assert "medmem.config" in modules and "medmem.settings" in modules
    heavy = {module.split(".")[0] for module in modules} & {"torch", "monai", "faiss", "SimpleITK"}
    assert not heavy, f"planning imported {sorted(heavy)}"


def test_a_config_error_stops_the_plan_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["diffusion"]["epoch"] = 5
    write_config(tmp_path, config)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path), "-n"],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "diffusion: Additional properties are not allowed ('epoch'" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def outside_audit_config(workdir: Path) -> dict:
    """A folder of 28 patients and a folder of 14 synthetic volumes made elsewhere: exact copies of patients
    0-4 (patient 4's saved as NRRD in LPS storage), a re-noised copy of patient 5, and 8 new volumes. Whichever
    side of the split each copied patient lands on, none of the six may be released."""
    import SimpleITK as sitk
    from procedural_cohort import ellipsoid_volumes

    from medmem import artefacts

    cohort, others = ellipsoid_volumes(28, 16, seed=11), ellipsoid_volumes(8, 16, seed=12)
    for index, volume in enumerate(cohort):
        artefacts.save_nifti(workdir / "cohort" / f"patient_{index:02d}.nii.gz", volume, np.diag([8.0, 8, 8, 1]))
    for index in range(4):
        artefacts.save_nifti(workdir / "synthetic" / f"copy_of_patient_{index:02d}.nii.gz", cohort[index],
                             np.diag([8.0, 8, 8, 1]))
    image = sitk.GetImageFromArray(np.ascontiguousarray(cohort[4].transpose(2, 1, 0)))
    image.SetSpacing((8.0, 8.0, 8.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS storage of the same RAS volume
    sitk.WriteImage(image, str(workdir / "synthetic" / "copy_of_patient_04.nrrd"))
    noisy = cohort[5] + np.random.default_rng(13).normal(0, 0.005, cohort[5].shape).astype(np.float32)
    artefacts.save_nifti(workdir / "synthetic" / "near_copy_of_patient_05.nii.gz", noisy, np.diag([8.0, 8, 8, 1]))
    for index, volume in enumerate(others):
        artefacts.save_nifti(workdir / "synthetic" / f"new_{index:02d}.nii.gz", volume, np.diag([8.0, 8, 8, 1]))
    config = tiny_config()
    config["data"].update(source="folder", folder={**config["data"]["folder"], "path": str(workdir / "cohort")})
    config["synthetic"] = {"source": "folder", "folder": str(workdir / "synthetic")}
    # The shift search through the whole chain (embed → similarity → assess): 27 shifts of ±1 voxel, each also
    # mirrored (detector.flip_search, the default).
    config["detector"]["shift_search"] = 1
    config["experiments"] = {"outside": {}}
    return config


@pytest.mark.workflow
def test_an_outside_folder_is_audited_without_training_a_generator(tmp_path):
    write_config(tmp_path, outside_audit_config(tmp_path))
    jobs = planned_jobs(tmp_path)
    assert jobs == {"all": 1, "ingest": 1, "ingest_synthetic": 1, "split": 1, "plant_controls": 1,
                    "train_detector": 1, "embed_split": 2, "embed_set": 2, "similarity": 1, "baselines": 1, "baselines_controls": 1,
                    "screen": 1, "assess": 1, "quality": 1, "release": 1, "report": 1, "total": 18}
    inputs_before = input_digests(tmp_path / "cohort", tmp_path / "synthetic")
    snakemake(tmp_path, *CPU_RUN)
    results = tmp_path / "results"
    split = pd.read_csv(next((results / "split").glob("*/split.csv"))).set_index("id")["split"]
    per_sample = pd.read_csv(tmp_path / "results" / "experiments" / "outside" / "per_sample.csv").set_index(
        "synthetic_id")
    assert len(per_sample) == 14
    for embeddings in (results / "embeddings").glob("*/*.npz"):
        with np.load(embeddings) as data:
            if embeddings.stem == "train":  # searched unshifted: no shifts embedded
                assert "shifted" not in data
            else:
                assert data["shifted"].shape[:2] == (len(data["ids"]), 2 * 27), embeddings
    assert "best of 54 shifts" in next((results / "logs" / "similarity").glob("*.log")).read_text()
    assert sum(split[f"patient_{i:02d}"] == "train" for i in range(5)) >= 2  # the split is seeded
    for index in range(5):
        source = f"patient_{index:02d}"
        if split[source] == "train":  # a copy of a training patient is found, and named
            assert per_sample.at[f"copy_of_{source}", "nearest_train_id"] == source
            assert per_sample.at[f"copy_of_{source}", "is_copy"]
    statement = json.loads((results / "experiments" / "outside" / "release" / "release.json").read_text())
    removed = {r["id"]: r for r in statement["removed"]}
    assert {f"copy_of_patient_{i:02d}" for i in range(5) if split[f"patient_{i:02d}"] == "train"} <= set(removed)
    # Every real scan, of a training or a held-out patient, is screened out and named, exact or re-noised.
    assert {"holdout", "train"} <= {split[f"patient_{i:02d}"] for i in range(6)}
    real_scans = {f"copy_of_patient_{i:02d}": f"patient_{i:02d}" for i in range(5)}
    real_scans["near_copy_of_patient_05"] = "patient_05"
    for volume_id, case in real_scans.items():
        assert removed[volume_id]["real_scan"]["real_case"] == case, volume_id
        assert removed[volume_id]["real_scan"]["split"] == split[case]
        assert removed[volume_id]["real_scan"]["identical"] == volume_id.startswith("copy")
        assert per_sample.at[volume_id, "real_scan"] and per_sample.at[volume_id, "nearest_real_id"] == case
    assert not per_sample.loc[[f"new_{i:02d}" for i in range(8)], "real_scan"].any()
    assert statement["screening"]["n_real_cases"] == 28 and statement["screening"]["n_real_scans_removed"] == 6
    released = pd.read_csv(results / "experiments" / "outside" / "release" / "manifest.csv")["id"]
    assert not set(released) & set(real_scans)
    assert input_digests(tmp_path / "cohort", tmp_path / "synthetic") == inputs_before  # inputs never modified


def input_digests(*folders: Path) -> dict[str, str]:
    """sha256 of every file below ``folders`` (and the folders' listings): proof that an audit left them as it found them."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for folder in folders for p in sorted(folder.rglob("*"))}


def test_experiments_from_the_command_line_replace_the_default_ones(tmp_path):
    write_config(tmp_path, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"experiments": {"mine": {"diffusion": {"epochs": 7}}}}))
    jobs = planned_jobs(tmp_path, "--configfile", str(tmp_path / "mine.yaml"))
    # Only `mine` is planned: not the defaults' baseline and canaries beside it.
    assert jobs["assess"] == 1 and jobs["train_diffusion"] == 1


@pytest.mark.parametrize("study, expected", [
    # One 400-epoch diffusion run, four checkpoints sampled. The controls reconstruct through the experiment's
    # autoencoder: one set of controls (and of baselines on them) per autoencoder, and one decoding of the real
    # volumes and controls through it (similarity.reference: decoded), embedded.
    ("training_length", {"train_autoencoder": 1, "plant_controls": 1, "baselines_controls": 1, "train_detector": 1,
                         "train_diffusion": 1, "sample": 4, "decode": 1, "embed_split": 2, "embed_set": 5, "screen": 4, "assess": 4, "total": 45}),
    # Two seeds per experiment (replicates: 2): four diffusion models, one instrument.
    ("augmentation", {"train_autoencoder": 1, "plant_controls": 1, "baselines_controls": 1, "train_detector": 1,
                      "train_diffusion": 4, "sample": 4, "decode": 1, "embed_split": 2, "embed_set": 5, "screen": 4, "assess": 4, "total": 48}),
    # Model size changes the autoencoder too, and with it the controls; the detector is shared.
    ("model_size", {"train_autoencoder": 3, "plant_controls": 3, "baselines_controls": 3, "train_detector": 1,
                    "train_diffusion": 3, "sample": 3, "decode": 3, "embed_split": 2, "embed_set": 6, "screen": 3, "assess": 3, "total": 49}),
    # The VAE is the LDM's own autoencoder: one autoencoder and one set of controls for both; the GAN trains on
    # its own, its controls band-limit (it has no autoencoder).
    ("model_families", {"train_autoencoder": 1, "plant_controls": 2, "baselines_controls": 2, "train_diffusion": 1,
                        "sample": 1, "sample_vae": 1, "train_gan": 1, "sample_gan": 1, "train_detector": 1,
                        "decode": 1, "embed_split": 2, "embed_set": 5, "screen": 3, "assess": 3, "total": 41}),
    # Each fraction below 1 takes its subset and trains its own generator; the detector is shared.
    ("training_size", {"train_subset": 2, "train_autoencoder": 3, "plant_controls": 3, "baselines_controls": 3,
                       "train_detector": 1, "train_diffusion": 3, "sample": 3, "decode": 3, "embed_split": 2, "embed_set": 6, "similarity": 3,
                       "screen": 3, "assess": 3, "total": 51}),
])
def test_study_sets_plan_each_shared_stage_once(tmp_path, study, expected):
    write_config(tmp_path, yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    jobs = planned_jobs(tmp_path, "--configfile", str(ROOT / "config" / "experiments" / f"{study}.yaml"))
    for shared in ("ingest", "split", "report"):
        assert jobs[shared] == 1, shared
    assert {rule: jobs[rule] for rule in expected} == expected


@pytest.mark.workflow
def test_2d_mode_runs_every_model_family_end_to_end(tmp_path):
    """Radiograph-like 2D images through every stage: ingest, three generators, detector, audit, report; on the
    fast path (precision bf16: every training, sampling and embedding under bfloat16 autocast)."""
    config = tiny_config()
    config["data"].update(shape=[32, 32], spacing=[8.0, 8.0])
    config["gan"].update(epochs=3)
    config["precision"] = "bf16"
    config["experiments"] = {"ldm": {}, "vae": {"synthetic": {"source": "vae"}}, "gan": {"synthetic": {"source": "gan"}}}
    write_config(tmp_path, config)
    snakemake(tmp_path, *CPU_RUN)
    results = tmp_path / "results"
    for volumes in [*results.glob("ingest/*/volumes"), *results.glob("sample*/*/volumes"),
                    *results.glob("controls/*/volumes")]:
        image = nib.load(next(volumes.glob("*.nii.gz")))
        assert image.shape == (32, 32), volumes
    summary = pd.read_csv(results / "report" / "summary.csv").set_index("experiment")
    assert sorted(summary.index) == ["gan", "ldm", "vae"]
    for experiment in summary.index:
        controls = pd.read_csv(results / "experiments" / experiment / "controls.csv")
        exact = controls[(controls["method"] == "contrastive") & (controls["strength"] == "exact")]
        assert exact["recall"].iloc[0] == 1.0, experiment  # a planted exact copy is always found
        assert (results / "experiments" / experiment / "montage.png").stat().st_size > 0
    sidecars = [*results.glob("*/*/*.pt.json"), *results.glob("embeddings/*/*.npz.json"),
                *results.glob("sample/*/manifest.csv.json"), *results.glob("sample_vae/*/manifest.csv.json")]
    assert {path.parent.parent.name for path in sidecars} >= {"autoencoder", "diffusion", "gan", "detector", "embeddings",
                                                               "sample", "sample_vae"}
    assert {json.loads(path.read_text())["precision"] for path in sidecars} == {"bf16"}


"""The workflow as a user runs it: dry-run plans, and a tiny end-to-end `snakemake` run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"


def tiny_config() -> dict:
    """The demo config shrunk to run end to end in a couple of minutes on 2 CPU cores."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["data"]["shape"] = [16, 16, 16]
    config["data"]["spacing"] = [8.0, 8.0, 8.0]
    config["data"]["phantom"]["n_patients"] = 28  # 21 train (enough for a 95th percentile), 7 holdout
    config["split"].update(min_holdout=5)
    config["autoencoder"].update(epochs=3, adversarial_warmup_epochs=2, batch_size=4)
    config["diffusion"].update(channels=[16, 32], norm_num_groups=8, epochs=4, batch_size=8)
    config["sample"].update(steps=5, n_samples=12)
    config["detector"].update(channels=[8, 16], epochs=4, batch_size=8)
    config["assess"].update(montage_pairs=3)
    config["experiments"] = {"baseline": {}, "long_training": {"diffusion": {"epochs": 8}}}
    return config


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def planned_jobs(workdir: Path) -> dict[str, int]:
    """Rule → job count of a dry run, read from Snakemake's job-stats table."""
    output = snakemake(workdir, "-n")
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
    # Two experiments, differing only in diffusion epochs, share ingest, split, autoencoder, detector
    # and the detector's train/holdout embeddings.
    assert jobs == {"all": 1, "ingest": 1, "split": 1, "train_autoencoder": 1, "train_detector": 1,
                    "train_diffusion": 2, "sample": 2, "embed": 4, "similarity": 2, "assess": 2,
                    "report": 1, "total": 18}


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    write_config(workdir, tiny_config())
    snakemake(workdir, "--cores", "2")
    return workdir


def test_end_to_end_outputs_are_consistent(tiny_run):
    results = tiny_run / "results"
    index = pd.read_csv(results / "report" / "index.csv")
    summary = pd.read_csv(results / "report" / "summary.csv")
    assert list(summary["experiment"]) == ["baseline", "long_training"]
    keys = index.pivot(index="stage", columns="experiment", values="key")
    assert (keys.loc["autoencoder", "baseline"]) == keys.loc["autoencoder", "long_training"]

    for name in ("baseline", "long_training"):
        folder = results / "experiments" / name
        memorization = pd.read_csv(folder / "memorization.csv").iloc[0]
        per_sample = pd.read_csv(folder / "per_sample.csv")
        per_training = pd.read_csv(folder / "per_training.csv")
        similarity = results / "similarity" / keys.loc["similarity", name]
        train_to_holdout = pd.read_csv(similarity / "train_to_holdout.csv")
        nearest_holdout = train_to_holdout[train_to_holdout["rank"] == 1]["correlation"]
        # τ is the 95th percentile of train → nearest-holdout correlations, recomputed here.
        assert memorization["tau"] == pytest.approx(np.percentile(nearest_holdout, 95.0), abs=1e-6)
        assert memorization["n_train"] == 21 and memorization["n_holdout"] == 7
        assert memorization["n_synthetic"] == 12 == len(per_sample)
        assert memorization["n_copies"] == int((per_sample["correlation"] > memorization["tau"]).sum())
        assert memorization["n_mem"] == int((per_training["correlation"] > memorization["tau"]).sum())
        assert memorization["pct_copies"] == pytest.approx(100 * memorization["n_copies"] / 12)
        for figure in ("nn_correlation.png", "montage.png"):
            assert (folder / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Samples carry the training geometry.
    import nibabel as nib
    cases = pd.read_csv(results / "ingest" / keys.loc["ingest", "baseline"] / "cases.csv")
    training_image = nib.load(results / "ingest" / keys.loc["ingest", "baseline"] / cases["path"][0])
    manifest = pd.read_csv(results / "sample" / keys.loc["sample", "baseline"] / "manifest.csv")
    sample_image = nib.load(results / "sample" / keys.loc["sample", "baseline"] / manifest["path"][0])
    assert sample_image.shape == training_image.shape == (16, 16, 16)
    np.testing.assert_allclose(sample_image.affine, training_image.affine)

    # Embeddings are L2-normalised float32 with ids.
    embeddings = np.load(results / "embeddings" / keys.loc["detector", "baseline"] / "train.npz")
    assert embeddings["vectors"].dtype == np.float32 and len(embeddings["ids"]) == 21
    np.testing.assert_allclose(np.linalg.norm(embeddings["vectors"], axis=1), 1.0, atol=1e-5)

    # Every training curve and log exists and shows progress.
    detector_curve = pd.read_csv(results / "detector" / keys.loc["detector", "baseline"] / "curve.csv")
    assert {"loss", "positive_similarity", "negative_similarity"} <= set(detector_curve.columns)
    assert len(detector_curve) == 4


def test_a_planted_copy_is_found_and_held_out_patients_mostly_are_not(tiny_run):
    """The trained detector, applied as the workflow does, flags an exact copy of a training volume."""
    from medmem import detector, embed, similarity, volume_sets

    results = tiny_run / "results"
    keys = pd.read_csv(results / "report" / "index.csv").query("experiment == 'baseline'").set_index("stage")["key"]
    ingest = results / "ingest" / keys["ingest"]
    split = results / "split" / keys["split"] / "split.csv"
    model, _ = detector.load(results / "detector" / keys["detector"] / "detector.pt", "cpu")
    train_ids, train_volumes, _ = volume_sets.load_split_set(ingest / "cases.csv", split, "train")
    train = embed.embed_volumes(model, train_volumes, "cpu")
    copies = embed.embed_volumes(model, train_volumes[:3].copy(), "cpu")
    neighbours = similarity.nearest_neighbours(["copy0", "copy1", "copy2"], copies, train_ids, train)
    tau = pd.read_csv(results / "experiments" / "baseline" / "memorization.csv")["tau"].iloc[0]
    assert list(neighbours["neighbour_id"]) == train_ids[:3]
    assert (neighbours["correlation"] > tau).all()
    holdout_to_train = pd.read_csv(results / "similarity" / keys["similarity"] / "holdout_to_train.csv")
    # Calibration: held-out patients exceed τ only rarely (7 of them here; allow 2 by chance).
    assert int((holdout_to_train.query("rank == 1")["correlation"] > tau).sum()) <= 2


def test_rerun_plans_nothing_and_a_changed_experiment_replans_only_its_branch(tiny_run):
    assert planned_jobs(tiny_run) == {}
    config = tiny_config()
    config["experiments"]["long_training"]["diffusion"]["epochs"] = 9
    write_config(tiny_run, config)
    try:
        jobs = planned_jobs(tiny_run)
    finally:
        write_config(tiny_run, tiny_config())
    assert jobs == {"all": 1, "train_diffusion": 1, "sample": 1, "embed": 1, "similarity": 1,
                    "assess": 1, "report": 1, "total": 7}

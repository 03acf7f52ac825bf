"""The paths in a config, checked before any job: the results folder, the data, the synthetic folder."""

import copy
import os
from pathlib import Path

import pytest
import yaml

from medmem.config import make_plan

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def disk(tmp_path):
    """A cohort folder (one DICOM patient folder inside), a manifest listing a file and a DICOM folder, a
    synthetic folder and a plain file."""
    for path in ("cohort/p0.nii.gz", "cohort/patA/IM0001", "scans/a.nii.gz", "scans/dicom/IM0001",
                 "synthetic/s0.nii.gz", "a_file"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text("patient_id,path\np1,scans/a.nii.gz\np2,scans/dicom\n")
    return tmp_path


def audit(disk: Path, data_source: str = "folder", synthetic: str | None = None, results: str = "results") -> dict:
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["results"] = results
    config["data"].update(source=data_source, manifest=str(disk / "manifest.csv"))
    config["data"]["folder"]["path"] = str(disk / "cohort")
    if synthetic is not None:
        config["synthetic"] = {"source": "folder", "folder": synthetic}
    config["experiments"] = {"audit": {}}
    return config


@pytest.mark.parametrize("case, message", [
    # The results folder
    (lambda d: audit(d, results=""), "config: results='' is empty, which would put every artefact under the file "
                                     "system's root: set results to the folder for every artefact"),
    (lambda d: audit(d, results="/"), "config: results='/' is the file system's root"),
    (lambda d: audit(d, results=str(d / "a_file")), "is a file, not a folder: set results to a folder"),
    (lambda d: audit(d, results=str(d / "a_file" / "results")), "a_file/results' lies inside"),
    (lambda d: audit(d, results=str(d / "cohort" / "out")),
     "results='{}/cohort/out' lies inside data.folder.path={}/cohort (experiment 'audit'), a folder that ingest "
     "reads: outputs and logs would be written among the input data"),
    (lambda d: audit(d, synthetic=str(d / "synthetic"), results=str(d / "synthetic")),
     "results='{}/synthetic' is synthetic.folder={}/synthetic"),
    (lambda d: audit(d, "manifest", results=str(d / "scans" / "dicom" / "results")),
     "lies inside {}/scans/dicom, listed in data.manifest={}/manifest.csv"),
    # A synthetic folder among the real cases
    (lambda d: audit(d, synthetic=str(d / "cohort")),
     "experiment 'audit': synthetic.folder={}/cohort is data.folder.path={}/cohort: real patients' cases. The audit "
     "would count those patients as synthetic volumes, and the release would publish them"),
    (lambda d: audit(d, synthetic=str(d)), "synthetic.folder={} contains data.folder.path={}/cohort"),
    (lambda d: audit(d, synthetic=str(d / "cohort" / "patA")), "synthetic.folder={}/cohort/patA lies inside "
                                                               "data.folder.path={}/cohort"),
    (lambda d: audit(d, "manifest", synthetic=str(d / "scans")),
     "synthetic.folder={}/scans contains {}/scans/a.nii.gz, listed in data.manifest={}/manifest.csv"),
    (lambda d: audit(d, "manifest", synthetic=str(d / "scans" / "dicom")), "synthetic.folder={}/scans/dicom is "),
    (lambda d: (os.symlink(d / "cohort", d / "alias"), audit(d, synthetic=str(d / "alias")))[1],
     "synthetic.folder={}/alias is data.folder.path={}/cohort"),
    # What the data settings name must be there
    (lambda d: audit(d, synthetic=str(d / "nowhere")), "synthetic.folder={}/nowhere does not exist"),
    (lambda d: {**audit(d), "data": {**audit(d)["data"], "folder": {**audit(d)["data"]["folder"],
                                                                     "path": str(d / "a_file")}}},
     "data.folder.path={}/a_file is not a folder"),
    (lambda d: {**audit(d, "manifest"), "data": {**audit(d, "manifest")["data"], "manifest": str(d / "scans")}},
     "data.manifest={}/scans is a folder"),
])
def test_bad_paths_are_refused_before_any_job_naming_the_key_and_the_fix(disk, case, message):
    with pytest.raises(ValueError) as error:
        make_plan(case(disk), SCHEMA)
    assert message.replace("{}", str(disk)) in str(error.value)


def test_a_synthetic_folder_apart_from_the_real_cases_is_planned(disk):
    for source in ("folder", "manifest"):
        plan = make_plan(audit(disk, source, synthetic=str(disk / "synthetic")), SCHEMA)
        assert "ingest_synthetic" in plan.experiments["audit"]


def test_home_is_expanded_in_every_path_and_keys_are_those_of_the_expanded_paths(disk, monkeypatch):
    monkeypatch.setenv("HOME", str(disk))
    config = audit(disk, "manifest", synthetic="~/synthetic", results="~/out")
    config["data"].update(manifest="~/manifest.csv")
    config["data"]["folder"]["path"] = "~/cohort"
    config["quality"]["fid_weights"] = "~/weights.pt"
    plan = make_plan(copy.deepcopy(config), SCHEMA)
    assert plan.results == str(disk / "out")
    effective = plan.effective["audit"]
    assert effective["data"]["manifest"] == str(disk / "manifest.csv")
    assert effective["data"]["folder"]["path"] == str(disk / "cohort")
    assert effective["synthetic"]["folder"] == str(disk / "synthetic")
    assert effective["quality"]["fid_weights"] == str(disk / "weights.pt")
    expanded = audit(disk, "manifest", synthetic=str(disk / "synthetic"), results=str(disk / "out"))
    expanded["quality"]["fid_weights"] = str(disk / "weights.pt")
    assert make_plan(expanded, SCHEMA).experiments == plan.experiments

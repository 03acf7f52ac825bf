"""Reruns reproduce: the same config and seeds, run twice on CPU in two folders, give the same bytes.

The second run is the tiny audit's baseline experiment alone, in a fresh folder; the first is the shared tiny
run (conftest.py), which also holds that experiment: every stage of the second run has the same key there.
Compared: every file of the second run under results/ except the rule logs (timestamps), the rules' benchmark
files (wall time and memory) and the cross-experiment report (it lists the experiments of its run), byte for byte against the same file of the first (checkpoints,
NIfTI volumes, embeddings, tables, figures), except two kinds that hold a value that is not about the numbers:
- training curves (curve.csv): every column but `seconds`, the epoch's wall time;
- sidecars (*.json): every field but `code_version`, which names the checkout's commit and so changes when
  someone commits between the two runs (it must be one value within a run).
"""

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
from test_workflow import CPU_RUN, snakemake, tiny_config, write_config


def run(workdir: Path) -> Path:
    config = tiny_config()
    config["experiments"] = {"baseline": {}}  # one experiment: every stage, once
    write_config(workdir, config)
    snakemake(workdir, *CPU_RUN)
    return workdir / "results"


def csv_without_wall_time(path: Path) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    keep = [index for index, name in enumerate(rows[0]) if name != "seconds"]
    return [[row[index] for index in keep] for row in rows]


def fingerprint(path: Path):
    if path.name == "curve.csv":
        return csv_without_wall_time(path)
    if path.suffix == ".json":
        sidecar = json.loads(path.read_text())
        sidecar.pop("code_version", None)
        return sidecar
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artefacts(results: Path) -> dict[str, Path]:
    return {str(path.relative_to(results)): path for path in sorted(results.rglob("*"))
            if path.is_file() and path.suffix != ".log"}


@pytest.mark.workflow
def test_a_second_run_of_the_same_config_gives_identical_tables_and_weights(tiny_run, tmp_path):
    first = artefacts(tiny_run / "results")
    second = {name: path for name, path in artefacts(run(tmp_path / "second")).items()
              if not name.startswith(("report/", ".medmem/", "benchmarks/"))}
    missing = sorted(set(second) - set(first))
    assert not missing, f"the shared run lacks {missing[:20]}: are its stages keyed like this run's?"
    assert len(second) > 100
    kinds = {Path(name).suffix for name in second}
    assert {".csv", ".pt", ".npz", ".gz", ".json", ".png"} <= kinds, kinds  # tables, weights, embeddings, volumes
    different = [name for name in second if fingerprint(first[name]) != fingerprint(second[name])]
    assert not different, f"{len(different)} of {len(second)} artefacts differ: {different[:20]}"

    sidecars = [json.loads(path.read_text()) for name, path in first.items() if name.endswith(".pt.json")]
    assert len({sidecar["code_version"] for sidecar in sidecars}) == 1
    for sidecar in sidecars:  # each names the packages, the settings, the seed and the code it came from
        assert {"torch", "numpy", "monai", "snakemake"} <= set(sidecar["packages"])
        assert sidecar["settings"] and sidecar["seed"] is not None and sidecar["code_version"]

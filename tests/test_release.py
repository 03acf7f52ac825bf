import json

import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, release


def score_rows(method, score_set, ids, neighbours, scores):
    return pd.DataFrame({"method": method, "set": score_set, "query_id": ids, "neighbour_id": neighbours,
                         "score": scores})


@pytest.fixture()
def audit(tmp_path):
    """Two methods; calibration scores 0.0..0.9 (95th percentile 0.855, 80th 0.72); four synthetic volumes."""
    calibration = [0.1 * i for i in range(10)]
    scores = pd.concat([
        score_rows("contrastive", "calibration", [f"t{i}" for i in range(10)], ["h0"] * 10, calibration),
        score_rows("pixel_pearson", "calibration", [f"t{i}" for i in range(10)], ["h0"] * 10, calibration),
        # s0: a copy by both methods; s1: by pixel_pearson only; s2: a near-miss (0.8); s3: clean.
        score_rows("contrastive", "synthetic", ["s0", "s1", "s2", "s3"], ["t0", "t1", "t2", "t3"],
                   [0.99, 0.5, 0.8, 0.1]),
        score_rows("pixel_pearson", "synthetic", ["s0", "s1", "s2", "s3"], ["t0", "t5", "t2", "t3"],
                   [0.97, 0.9, 0.3, 0.2]),
    ])
    scores_csv = tmp_path / "scores.csv"
    artefacts.write_csv(scores_csv, scores)
    rng = np.random.default_rng(0)
    ids = ["s0", "s1", "s2", "s3"]
    for volume_id in ids:
        artefacts.save_nifti(tmp_path / "sample" / "volumes" / f"{volume_id}.nii.gz",
                             rng.random((4, 4, 4), dtype=np.float32), np.eye(4))
    manifest = tmp_path / "sample" / "manifest.csv"
    artefacts.write_csv(manifest, pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
    return scores_csv, manifest


def run_release(tmp_path, audit, settings):
    out = tmp_path / "release"
    statement = release.run(settings, *audit, out / "manifest.csv", out / "release.json", out / "volumes")
    return out, statement


def test_release_keeps_only_what_no_method_flags(tmp_path, audit):
    out, statement = run_release(tmp_path, audit, release.Settings(percentile=95.0,
                                                                   methods=("contrastive", "pixel_pearson")))
    assert statement["thresholds"] == {"contrastive": pytest.approx(0.855), "pixel_pearson": pytest.approx(0.855)}
    kept = pd.read_csv(out / "manifest.csv")
    assert kept["id"].tolist() == ["s2", "s3"]
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["s2.nii.gz", "s3.nii.gz"]
    # The copied volumes are the synthetic volumes, byte for byte, and the inputs are untouched.
    assert (out / "volumes" / "s2.nii.gz").read_bytes() == (tmp_path / "sample" / "volumes" / "s2.nii.gz").read_bytes()
    assert len(list((tmp_path / "sample" / "volumes").iterdir())) == 4
    written = json.loads((out / "release.json").read_text())
    assert (written["n_synthetic"], written["n_released"], written["n_removed"]) == (4, 2, 2)
    removed = {r["id"]: r for r in written["removed"]}
    assert removed["s0"]["flagged_by"] == ["contrastive", "pixel_pearson"]
    assert removed["s1"]["flagged_by"] == ["pixel_pearson"]
    assert removed["s1"]["nearest_train"]["pixel_pearson"] == "t5"
    assert removed["s1"]["scores"]["pixel_pearson"] == pytest.approx(0.9)


def test_a_stricter_percentile_also_removes_near_misses(tmp_path, audit):
    out, statement = run_release(tmp_path, audit, release.Settings(percentile=70.0, methods=("contrastive",)))
    assert statement["thresholds"]["contrastive"] == pytest.approx(0.63)
    assert pd.read_csv(out / "manifest.csv")["id"].tolist() == ["s1", "s3"]
    assert [r["id"] for r in statement["removed"]] == ["s0", "s2"]


def test_release_settings_are_checked(tmp_path, audit):
    with pytest.raises(ValueError, match="release.percentile = 100"):
        release.Settings(percentile=100)
    with pytest.raises(ValueError, match="release.methods"):
        release.Settings(methods=())
    with pytest.raises(ValueError, match=r"release.methods lists \['ssim'\].*add them to baselines.methods"):
        run_release(tmp_path, audit, release.Settings(methods=("contrastive", "ssim")))
    assert not (tmp_path / "release").exists()


def test_all_methods_decide_by_default(tmp_path, audit):
    _, statement = run_release(tmp_path, audit, release.Settings())
    assert statement["methods"] == ["contrastive", "pixel_pearson"]
    assert statement["n_released"] == 2

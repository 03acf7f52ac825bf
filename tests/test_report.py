import pandas as pd
import pytest

from medmem import artefacts, report


def write_experiment(folder, verdict, pct_copies):
    memorization = {"tau": 0.9, "percentile": 95.0, "n_copies": 3, "pct_copies": pct_copies,
                    "pct_copies_low": pct_copies - 5, "pct_copies_high": pct_copies + 5, "n_mem": 2, "pct_mem": 10.0,
                    "pct_mem_low": 5.0, "pct_mem_high": 15.0, "nominal_fpr": 0.05, "holdout_fpr": 0.1,
                    "confidence": 0.95, "verdict": verdict}
    artefacts.write_csv(folder / "memorization.csv", pd.DataFrame([memorization]))
    artefacts.write_csv(folder / "quality.csv", pd.DataFrame([{"n_synthetic": 20, "ms_ssim_synthetic": 0.8,
                                                               "frechet_detector": 0.4}]))
    artefacts.write_json(folder / "release" / "release.json",
                         {"percentile": 95.0, "n_released": 17, "n_removed": 3, "removed": []})
    return folder


def test_summary_joins_memorization_quality_and_release(tmp_path):
    folders = {"a": write_experiment(tmp_path / "a", "conclusive: fine", 15.0),
               "b": write_experiment(tmp_path / "b", "inconclusive: the detector misses known copies", 30.0)}
    summary = report.run({n: f / "memorization.csv" for n, f in folders.items()},
                         {n: f / "quality.csv" for n, f in folders.items()},
                         {n: f / "release" / "release.json" for n, f in folders.items()},
                         index_rows=[{"experiment": "a", "stage": "ingest", "key": "0123456789"}],
                         summary_csv=tmp_path / "summary.csv", index_csv=tmp_path / "index.csv",
                         figure_png=tmp_path / "summary.png")
    written = pd.read_csv(tmp_path / "summary.csv")
    assert written["experiment"].tolist() == ["a", "b"]
    assert written.at[1, "verdict"].startswith("inconclusive")
    assert written.at[0, "quality_frechet_detector"] == pytest.approx(0.4) and "quality_n_synthetic" not in written
    assert written["n_released"].tolist() == [17, 17] and summary["pct_copies"].tolist() == [15.0, 30.0]
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(tmp_path / "index.csv", dtype=str).at[0, "key"] == "0123456789"


def test_summary_refuses_a_table_of_several_rows(tmp_path):
    folder = write_experiment(tmp_path / "a", "conclusive", 10.0)
    artefacts.write_csv(folder / "quality.csv", pd.DataFrame([{"mmd_detector": 0.1}, {"mmd_detector": 0.2}]))
    with pytest.raises(ValueError, match="expected one row of quality figures, found 2"):
        report.summarise({"a": folder / "memorization.csv"}, {"a": folder / "quality.csv"},
                         {"a": folder / "release" / "release.json"})

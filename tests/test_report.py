import numpy as np
import pandas as pd
import pytest

from medmem import artefacts, report


PNG = b"\x89PNG\r\n\x1a\n"


def write_experiment(folder, verdict, pct_copies, pct_mem=10.0, frechet_detector=0.4, holdout_fpr=0.1):
    memorization = {"tau": 0.9, "percentile": 95.0, "n_copies": 3, "pct_copies": pct_copies,
                    "pct_copies_low": pct_copies - 5, "pct_copies_high": pct_copies + 5, "n_mem": 2,
                    "pct_mem": pct_mem, "pct_mem_low": pct_mem - 5, "pct_mem_high": pct_mem + 5,
                    "nominal_fpr": 0.05, "holdout_fpr": holdout_fpr, "confidence": 0.95, "verdict": verdict}
    artefacts.write_csv(folder / "memorization.csv", pd.DataFrame([memorization]))
    artefacts.write_csv(folder / "quality.csv", pd.DataFrame([{"n_synthetic": 20, "ms_ssim_synthetic": 0.8,
                                                               "frechet_detector": frechet_detector}]))
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
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG
    assert pd.read_csv(tmp_path / "index.csv", dtype=str).at[0, "key"] == "0123456789"


def test_differences_from_the_named_reference_reach_the_summary_and_the_study_table(tmp_path):
    folders = {}
    for name, memorized, copies in (("short", 1, 0), ("long", 9, 8), ("canaries", 2, 1)):
        folder = folders[name] = write_experiment(tmp_path / name, "conclusive: fine", 100 * copies / 20)
        artefacts.write_csv(folder / "per_training.csv", pd.DataFrame(
            {"train_id": [f"t{i}" for i in range(20)], "memorized": [i < memorized for i in range(20)]}))
        artefacts.write_csv(folder / "per_sample.csv", pd.DataFrame(
            {"synthetic_id": [f"s{i}" for i in range(20)], "is_copy": [i < copies for i in range(20)]}))
    summary = report.run({n: f / "memorization.csv" for n, f in folders.items()},
                         {n: f / "quality.csv" for n, f in folders.items()},
                         {n: f / "release" / "release.json" for n, f in folders.items()},
                         index_rows=[], summary_csv=tmp_path / "summary.csv", index_csv=tmp_path / "index.csv",
                         figure_png=tmp_path / "summary.png", study={"reference": "long"},
                         study_png=tmp_path / "study.png", study_csv=tmp_path / "study.csv",
                         per_training_csvs={n: f / "per_training.csv" for n, f in folders.items()},
                         per_sample_csvs={n: f / "per_sample.csv" for n, f in folders.items()},
                         bootstrap={"resamples": 500, "confidence": 0.95, "seed": 0})
    written = pd.read_csv(tmp_path / "summary.csv").set_index("experiment")
    assert written["reference"].tolist() == ["long"] * 3 and written.at["long", "difference_mem"] == "reference"
    assert written.at["short", "delta_pct_mem"] == pytest.approx(-40.0)
    assert written.at["short", "difference_mem"] == written.at["short", "difference_copies"] == "less"
    assert summary.set_index("experiment").at["canaries", "delta_pct_copies"] == pytest.approx(-35.0)
    # Without a factor the study table keeps every experiment, now with its difference.
    study = pd.read_csv(tmp_path / "study.csv")
    assert study["experiment"].tolist() == ["short", "long", "canaries"] and "difference_mem" in study
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG


def test_replicates_get_their_experiments_study_value_difference_and_spread(tmp_path):
    folders = {}
    for name, memorized in (("short", 1), ("long-seed0", 8), ("long-seed1", 12)):
        folder = folders[name] = write_experiment(tmp_path / name, "conclusive: fine", 10.0, pct_mem=5 * memorized)
        artefacts.write_csv(folder / "per_training.csv", pd.DataFrame(
            {"train_id": [f"t{i}" for i in range(20)], "memorized": [i < memorized for i in range(20)]}))
        artefacts.write_csv(folder / "per_sample.csv", pd.DataFrame(
            {"synthetic_id": [f"s{i}" for i in range(20)], "is_copy": [i < 2 for i in range(20)]}))
    report.run({n: f / "memorization.csv" for n, f in folders.items()},
               {n: f / "quality.csv" for n, f in folders.items()},
               {n: f / "release" / "release.json" for n, f in folders.items()},
               index_rows=[], summary_csv=tmp_path / "summary.csv", index_csv=tmp_path / "index.csv",
               figure_png=tmp_path / "summary.png", study={"factor": "epochs", "values": {"long": 400, "short": 100}},
               study_png=tmp_path / "study.png", study_csv=tmp_path / "study.csv",
               per_training_csvs={n: f / "per_training.csv" for n, f in folders.items()},
               per_sample_csvs={n: f / "per_sample.csv" for n, f in folders.items()},
               replicate_of={"short": "short", "long-seed0": "long", "long-seed1": "long"},
               seed_offset={"long-seed1": 1}, replicates_csv=tmp_path / "replicates.csv")
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("experiment")
    assert summary["replicate_of"].tolist() == ["short", "long", "long"]
    assert summary["seed_offset"].tolist() == [0, 0, 1]
    assert summary.at["long-seed0", "delta_pct_mem"] == summary.at["long-seed1", "delta_pct_mem"] == \
        pytest.approx(100 * (20 / 40 - 1 / 20))
    assert summary.at["long-seed0", "difference_mem"] == "more"
    study = pd.read_csv(tmp_path / "study.csv")
    assert study["experiment"].tolist() == ["short", "long-seed0", "long-seed1"] and study["factor"].tolist() == \
        [100, 400, 400]
    replicates = pd.read_csv(tmp_path / "replicates.csv").set_index("experiment")
    assert replicates.at["long", "n_replicates"] == 2 and replicates.at["short", "n_replicates"] == 1
    assert replicates.at["long", "pct_mem_mean"] == 50.0 and replicates.at["long", "pct_mem_std"] == \
        pytest.approx(np.std([40, 60], ddof=1))
    assert (replicates.at["long", "pct_mem_min"], replicates.at["long", "pct_mem_max"]) == (40, 60)
    assert np.isnan(replicates.at["short", "pct_mem_std"])
    assert (tmp_path / "study.png").read_bytes()[:8] == PNG


def test_summary_refuses_a_table_of_several_rows(tmp_path):
    folder = write_experiment(tmp_path / "a", "conclusive", 10.0)
    artefacts.write_csv(folder / "quality.csv", pd.DataFrame([{"mmd_detector": 0.1}, {"mmd_detector": 0.2}]))
    with pytest.raises(ValueError, match="expected one row of quality figures, found 2"):
        report.summarise({"a": folder / "memorization.csv"}, {"a": folder / "quality.csv"},
                         {"a": folder / "release" / "release.json"})


def run_report(tmp_path, folders, study):
    return report.run({n: f / "memorization.csv" for n, f in folders.items()},
                      {n: f / "quality.csv" for n, f in folders.items()},
                      {n: f / "release" / "release.json" for n, f in folders.items()},
                      index_rows=[], summary_csv=tmp_path / "summary.csv", index_csv=tmp_path / "index.csv",
                      figure_png=tmp_path / "summary.png", study=study, study_png=tmp_path / "study.png",
                      study_csv=tmp_path / "study.csv", privacy_utility_png=tmp_path / "privacy_utility.png")


def summary_of(names):
    """A summary table without files: one row per experiment, enough for study_table."""
    return pd.DataFrame({"experiment": names, "pct_mem": np.arange(len(names), dtype=float)})


def test_study_of_a_numeric_factor_is_sorted_and_drawn_with_an_inconclusive_experiment(tmp_path):
    folders = {"epochs_400": write_experiment(tmp_path / "e400", "inconclusive: the detector misses copies", 30.0,
                                              pct_mem=25.0, frechet_detector=0.2, holdout_fpr=0.08),
               "epochs_050": write_experiment(tmp_path / "e050", "conclusive", 5.0, pct_mem=6.0,
                                              frechet_detector=0.9),
               "epochs_100": write_experiment(tmp_path / "e100", "conclusive", 12.0, pct_mem=8.0,
                                              frechet_detector=0.5)}
    study = {"factor": "diffusion epochs", "values": {"epochs_400": 400, "epochs_050": 50, "epochs_100": 100}}
    run_report(tmp_path, folders, study)
    table = pd.read_csv(tmp_path / "study.csv")
    assert table["experiment"].tolist() == ["epochs_050", "epochs_100", "epochs_400"]
    assert table["factor"].tolist() == [50, 100, 400] and table.columns[:2].tolist() == ["experiment", "factor"]
    assert table["pct_copies"].tolist() == [5.0, 12.0, 30.0] and table.at[2, "verdict"].startswith("inconclusive")
    for name in ("study.png", "privacy_utility.png", "summary.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert artefacts.read_json(tmp_path / "study.csv.json")["settings"]["study"] == study


def test_study_of_categories_keeps_their_order_and_leaves_out_experiments_without_a_value():
    study = {"factor": "training set", "values": {"large": "1000 patients", "small": "100 patients"}}
    table = report.study_table(summary_of(["small", "unrelated", "large"]), study)
    assert table["experiment"].tolist() == ["large", "small"]
    assert table["factor"].tolist() == ["1000 patients", "100 patients"]
    assert table["pct_mem"].tolist() == [2.0, 0.0]


def test_study_of_numbers_keeps_the_given_order_of_ties_and_ignores_experiments_not_run():
    study = {"factor": "epochs", "values": {"c": 2, "ghost": 1, "b": 1, "a": 1.5}}
    table = report.study_table(summary_of(["a", "b", "c"]), study)
    assert table["experiment"].tolist() == ["b", "a", "c"] and table["factor"].tolist() == [1, 1.5, 2]


def test_study_without_a_run_experiment_names_both_sides():
    study = {"factor": "epochs", "values": {"epochs_050": 50, "epochs_100": 100}}
    with pytest.raises(ValueError, match=r"\['epochs_050', 'epochs_100'\].*none of them was run.*\['baseline'\]"):
        report.study_table(summary_of(["baseline"]), study)


@pytest.mark.parametrize("study, message", [
    ({"factor": "epochs", "values": {"a": 50, "b": "long"}}, "all numbers .* or all strings"),
    ({"factor": "epochs", "values": {}}, "study must be"),
    ({"values": {"a": 50}}, "study must be"),
])
def test_study_refuses_a_malformed_study(study, message):
    with pytest.raises(ValueError, match=message):
        report.study_table(summary_of(["a", "b"]), study)


def test_no_study_plots_every_experiment_in_order(tmp_path):
    folders = {"zeta": write_experiment(tmp_path / "z", "conclusive", 15.0, holdout_fpr=0.05),
               "alpha": write_experiment(tmp_path / "a", "inconclusive: holdout set too small", 25.0),
               "mid": write_experiment(tmp_path / "m", "conclusive", 10.0, frechet_detector=float("nan"))}
    run_report(tmp_path, folders, study=None)
    table = pd.read_csv(tmp_path / "study.csv")
    assert table["experiment"].tolist() == ["zeta", "alpha", "mid"] == table["factor"].tolist()
    assert (tmp_path / "study.png").read_bytes()[:8] == PNG
    assert (tmp_path / "privacy_utility.png").read_bytes()[:8] == PNG


def test_report_refuses_an_unmatched_study_before_writing_anything(tmp_path):
    folders = {"a": write_experiment(tmp_path / "a", "conclusive", 15.0)}
    with pytest.raises(ValueError, match="none of them was run"):
        run_report(tmp_path, folders, study={"factor": "epochs", "values": {"b": 1}})
    assert not any((tmp_path / name).exists() for name in ("index.csv", "summary.png", "summary.csv"))


def test_privacy_utility_needs_a_quality_column(tmp_path):
    with pytest.raises(ValueError, match="no quality column 'quality_fid'"):
        report.plot_privacy_utility(summary_of(["a"]), tmp_path / "privacy_utility.png", quality="quality_fid")


def test_the_cost_table_reads_the_benchmark_file_of_every_job_of_the_plan(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    jobs = {"train_autoencoder/ab12": "61.5\t0:01:01\t812.4\t2000\t700\t710\t0.1\t3.2\t95.0\t58.1\n",
            "embed_set/cd34-sample-ef56": "4.2\t0:00:04\t301.0\t900\t280\t290\t0\t0.1\t80.0\t3.3\n",
            "assess/long-run": "7.0\t0:00:07\t250.5\t800\t240\t245\t0\t0.2\t90.0\t6.1\n",
            "assess/other": "9.0\t0:00:09\t260.0\t800\t240\t245\t0\t0.2\t90.0\t8.0\n"}  # not this plan's
    for job, line in jobs.items():
        (tmp_path / job).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{job}.tsv").write_text(header + line)
    index_rows = [{"experiment": "base", "stage": "autoencoder", "key": "ab12"},
                  {"experiment": "long-run", "stage": "autoencoder", "key": "ab12"},
                  {"experiment": "long-run", "stage": "detector", "key": "cd34"}]
    costs = report.cost_table(tmp_path, index_rows)
    assert costs["job"].tolist() == ["ab12", "long-run", "cd34-sample-ef56"]  # longest first
    assert costs["rule"].tolist() == ["train_autoencoder", "assess", "embed_set"]
    assert costs["experiments"].tolist() == ["base;long-run", "long-run", "long-run"]
    assert costs.iloc[0][["wall_s", "max_rss_mb", "cpu_s", "mean_load"]].tolist() == [61.5, 812.4, 58.1, 95.0]

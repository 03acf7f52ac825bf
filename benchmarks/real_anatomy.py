"""Real anatomy, offline: how well each copy detector finds copies of real MRI (issue 13).

Patients are disjoint blocks of real MRI that PyPI packages ship, so the benchmark needs no download:
nilearn's MNI ICBM152 2009a T1 template (1 mm; `pip install -e ".[bench]"`) and nibabel's
`anatomical.nii` (a T1, 2 mm) and the first frame of `example4d.nii.gz` (an EPI, 2 × 2 × 2.2 mm). Blocks
come from the left half of each scan only: the template is exactly left-right symmetric, so a block
and its mirror image would be flipped copies of each other (the real heads roughly so). Each scan is
scaled to [0, 1] by its 0.5 and 99.5 percentiles, as ingest scales an MR scan; it is cut into cubes of
``--block-mm`` millimetres, those with at least half their voxels foreground (> 0.1, ingest's threshold)
are kept, and each is resampled (trilinear) onto a ``--grid``³ grid. A seeded split holds half of them out.

Positives: ``--per-kind`` training blocks copied at every strength in ``controls.STRENGTHS``
(``controls.transform``; without an autoencoder, a reconstruction is controls' band-limiting mimic of
one). Negatives: every held-out block, ``--per-kind`` reconstructed held-out blocks and as many averages
of training blocks (``controls.average``). Methods: the contrastive detector trained on the
training blocks by ``detector.run`` (config.yaml's ``detector`` section, keys overridden by
``--detector-config``) and searched by ``similarity.run``, and every method in ``baselines.METHODS``
(config.yaml's ``baselines`` settings), each scoring the sets exactly as its stage does.

Per method and copy kind: the ROC AUC against the held-out blocks and the recall at each threshold
rule; per method, the false-positive rate on held-out blocks and the share of each other negative
flagged. Rules: ``published``, Dar et al.'s τ (``assess.threshold`` on train → nearest held-out
scores; its false-positive rate is the share of held-out blocks above it), and ``calibrated``
(``calibration.conformal_threshold`` on the held-out blocks' own scores; its false-positive rate is
measured leave-one-out, as assess does). Writes ``--out`` (CSV) and prints
markdown tables. A measuring stick, not a fitting target: do not tune settings to it.

    .venv/bin/python benchmarks/real_anatomy.py --grid 32 --out real_anatomy_32.csv
"""

import argparse
import importlib.util
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from medmem import (artefacts, assess, baselines, calibration, controls, detector, embed,  # noqa: E402
                    similarity, volume_io)

PERCENTILES = (0.5, 99.5)  # ingest's default data.folder.mr_percentiles
FOREGROUND = 0.1  # ingest's default foreground_threshold
MIN_FOREGROUND_SHARE = 0.5  # a block is a patient when at least this share of it is foreground


def sources() -> dict[str, tuple[Path, int | None]]:
    """name → (NIfTI path, frame of a 4D file or None) of every scan the installed packages ship."""
    nibabel_data = Path(nib.__file__).parent / "tests" / "data"
    found = {"nibabel_anatomical": (nibabel_data / "anatomical.nii", None),
             "nibabel_example4d": (nibabel_data / "example4d.nii.gz", 0)}
    nilearn = importlib.util.find_spec("nilearn")  # the package's data folder only: nilearn is not imported
    if nilearn is None or nilearn.origin is None:
        raise SystemExit('nilearn is not installed: pip install -e ".[bench]" (its MNI template is most of the '
                         "patients; nothing is downloaded)")
    template = Path(nilearn.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    found["mni152_2009a"] = (template, None)
    missing = [str(path) for path, _ in found.values() if not path.exists()]
    if missing:
        raise SystemExit(f"missing from the installed packages: {missing}")
    return found


def blocks(block_mm: float, grid: int) -> tuple[list[str], np.ndarray]:
    """Ids and (N, grid, grid, grid) float32 blocks in [0, 1] of the left half of every source scan."""
    ids, volumes = [], []
    for name, (path, frame) in sources().items():
        image = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: array axis 0 runs left → right
        data = np.asarray(image.dataobj, dtype=np.float64)
        data = data[..., frame] if frame is not None else data
        data = volume_io.scale_to_unit(data, volume_io.percentile_range(data, PERCENTILES, path)).astype(np.float32)
        size = [max(1, round(block_mm / float(z))) for z in image.header.get_zooms()[:3]]
        left = data[:data.shape[0] // 2]
        counts = [extent // side for extent, side in zip(left.shape, size)]
        kept = 0
        for index in np.ndindex(*counts):
            block = left[tuple(slice(i * side, (i + 1) * side) for i, side in zip(index, size))]
            if (block > FOREGROUND).mean() < MIN_FOREGROUND_SHARE:
                continue
            resampled = F.interpolate(torch.from_numpy(np.ascontiguousarray(block))[None, None], size=(grid,) * 3,
                                      mode="trilinear", align_corners=False)[0, 0].numpy()
            ids.append(f"{name}_{'_'.join(map(str, index))}")
            volumes.append(np.clip(resampled, 0, 1))
            kept += 1
        print(f"{name}: {data.shape} voxels of {tuple(round(float(z), 2) for z in image.header.get_zooms()[:3])} "
              f"mm, blocks of {size} voxels: {kept} of {math.prod(counts)} in the left half kept")
    return ids, np.stack(volumes).astype(np.float32)


def probes(train: np.ndarray, holdout: np.ndarray, per_kind: int, seed: int) -> pd.DataFrame:
    """One row per probe: role (copy | negative), kind (strength or negative), source (index into train or
    holdout, −1 for an average) and the volume; the unchanged held-out blocks are scored as the holdout set."""
    rows = []
    for strength in controls.STRENGTHS:
        rng = np.random.default_rng([seed, controls.STRENGTHS.index(strength)])  # as controls.run draws
        for index in np.sort(rng.choice(len(train), size=min(per_kind, len(train)), replace=False)):
            rows.append({"role": "copy", "kind": strength, "source": int(index),
                         "volume": controls.transform(train[index], strength, rng)})
    # The negatives controls.run plants beside the held-out patients: reconstructed, and training averages.
    rng = np.random.default_rng([seed, controls.AVERAGE_STREAM])
    for index in np.sort(rng.choice(len(holdout), size=min(per_kind, len(holdout)), replace=False)):
        rows.append({"role": "negative", "kind": "holdout_reconstruction", "source": int(index),
                     "volume": controls.transform(holdout[index], "reconstruction", rng)})
    for _ in range(per_kind):
        chosen = rng.choice(len(train), size=rng.choice(controls.AVERAGE_SIZES), replace=False)
        rows.append({"role": "negative", "kind": "average", "source": -1,
                     "volume": controls.average([train[i] for i in chosen])})
    return pd.DataFrame(rows)


def contrastive(config: dict, folder: Path, train: np.ndarray, holdout: np.ndarray, probe_volumes: np.ndarray,
                block_mm: float) -> dict[str, np.ndarray]:
    """Train the detector on the training blocks and score the sets as the similarity stage does:
    {calibration: train → nearest holdout, holdout: holdout → nearest train, probes: probe → nearest train}."""
    grid = train.shape[1]
    affine = np.diag([block_mm / grid] * 3 + [1.0])
    names = {"train": [f"train_{i:03d}" for i in range(len(train))],
             "holdout": [f"holdout_{i:03d}" for i in range(len(holdout))],
             "probes": [f"probe_{i:04d}" for i in range(len(probe_volumes))]}
    for volume_id, volume in zip(names["train"] + names["holdout"] + names["probes"],
                                 np.concatenate([train, holdout, probe_volumes])):
        artefacts.save_nifti(folder / "volumes" / f"{volume_id}.nii.gz", volume, affine)
    patients = names["train"] + names["holdout"]
    artefacts.write_csv(folder / "cases.csv", pd.DataFrame({"id": patients,
                                                            "path": [f"volumes/{i}.nii.gz" for i in patients]}))
    artefacts.write_csv(folder / "split.csv", pd.DataFrame({"id": patients, "split": ["train"] * len(train)
                                                            + ["holdout"] * len(holdout)}))
    settings = detector.Settings(**config["detector"])
    cpu = torch.device("cpu")
    detector.run(settings, folder / "cases.csv", folder / "split.csv", folder / "detector.pt", folder / "curve.csv",
                 cpu)
    # As the embed stages do: the training set plain, the others at every variant of the detector's flip and
    # shift search.
    for name, ids in names.items():
        embed.run(folder / "detector.pt", ids, [str(folder / "volumes" / f"{i}.nii.gz") for i in ids],
                  folder / f"{name}.npz", cpu, at_shifts=name != "train")
    tables = {table: folder / f"{table}.csv" for table in ("synthetic_to_train", "train_to_synthetic",
                                                          "train_to_holdout", "holdout_to_train",
                                                          "controls_to_train")}
    # No autoencoder here: the blocks are compared as scanned (what similarity.reference: auto gives a folder).
    search = {"settings": similarity.Settings(**{**config["similarity"], "reference": "scanned"})}
    similarity.run(folder / "train.npz", folder / "holdout.npz", folder / "probes.npz", folder / "probes.npz",
                   folder / "split.csv", *tables.values(), **search)

    def nearest(table: str) -> np.ndarray:
        frame = pd.read_csv(tables[table]).query("rank == 1")
        return frame["score" if "score" in frame.columns else "correlation"].to_numpy()

    return {"calibration": nearest("train_to_holdout"), "holdout": nearest("holdout_to_train"),
            "probes": nearest("controls_to_train")}


def voxel_scores(method: str, settings: baselines.Settings, train: np.ndarray, holdout: np.ndarray,
                 table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The baseline's scores of the three sets, as baselines.run scores them."""
    shape = train.shape[1:]
    train, holdout = train.reshape(len(train), -1), holdout.reshape(len(holdout), -1)
    probe_volumes = np.stack(table["volume"]).reshape(len(table), -1)
    # A reconstructed held-out block is that patient: it leaves itself out of the held-out test set.
    leave_out = np.where(table["kind"] == "holdout_reconstruction", table["source"], -1)
    return {"calibration": baselines.score(method, settings, train, holdout, train, True, shape)[1],
            "holdout": baselines.score(method, settings, holdout, train, holdout, True, shape)[1],
            "probes": baselines.score(method, settings, probe_volumes, train, holdout, False, shape,
                                      leave_out=leave_out)[1]}


def measure(method: str, scores: dict[str, np.ndarray], table: pd.DataFrame, percentile: float) -> list[dict]:
    """Rows of the result table: per copy kind AUC and recall, per negative its flag rate, per rule."""
    rate = 1 - percentile / 100
    holdout = scores["holdout"]
    thresholds = {"published": assess.threshold(scores["calibration"], percentile),
                  "calibrated": calibration.conformal_threshold(holdout, rate)}
    rows = []
    kinds = [*table.groupby("kind", sort=False), ("all", table[table["role"] == "copy"]), ("holdout", None)]
    for kind, part in kinds:
        values = holdout if part is None else scores["probes"][part.index.to_numpy()]
        role = "negative" if part is None else part["role"].iloc[0]
        row = {"method": method, "role": role, "kind": kind, "n": len(values),
               "auc": calibration.roc_auc(values, holdout) if role == "copy" else np.nan}
        for rule, tau in thresholds.items():
            row[f"tau_{rule}"] = tau
            if kind == "holdout" and rule == "calibrated":
                # Each held-out block against the threshold of the others: it never tests a threshold it fitted.
                row[f"flagged_{rule}"] = calibration.leave_one_out_flag_rate(holdout, rate)[0] / len(holdout)
            else:
                row[f"flagged_{rule}"] = float(np.mean(values > tau))
        rows.append(row)
    return rows


def markdown(results: pd.DataFrame, rule: str) -> str:
    """Rows: methods; columns: AUC (recall) per copy kind, then each negative's flag rate."""
    copies = list(dict.fromkeys(results.loc[results["role"] == "copy", "kind"]))
    negatives = list(dict.fromkeys(results.loc[results["role"] == "negative", "kind"]))
    header = ["method", *copies, *[f"{n} {'FPR' if n == 'holdout' else 'flagged'}" for n in negatives]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, part in results.groupby("method", sort=False):
        part = part.set_index("kind")
        cells = [f"{part.at[c, 'auc']:.2f} ({part.at[c, f'flagged_{rule}']:.2f})" for c in copies]
        cells += [f"{part.at[n, f'flagged_{rule}']:.2f}" for n in negatives]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def main(grid: int, block_mm: float, per_kind: int, seed: int, detector_config: Path | None, out: Path,
         methods: tuple[str, ...] = (assess.CONTRASTIVE, *baselines.METHODS)) -> None:
    started = time.perf_counter()
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    if detector_config is not None:
        override = yaml.safe_load(detector_config.read_text()) or {}
        override = override.get("detector", override)
        config["detector"] = {**config["detector"], **{key: ({**config["detector"][key], **value}
                                                             if isinstance(value, dict) else value)
                                                       for key, value in override.items()}}
    percentile = float(config["assess"]["percentile"])
    ids, volumes = blocks(block_mm, grid)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = len(ids) // 2
    train, holdout = volumes[order[:n_train]], volumes[order[n_train:]]
    needed = assess.minimum_calibration_size(percentile)
    if min(len(train), len(holdout)) < needed:
        raise SystemExit(f"{len(train)} training and {len(holdout)} held-out blocks: the {percentile:g}th "
                         f"percentile needs {needed} of each; use a smaller --block-mm")
    table = probes(train, holdout, per_kind, seed)
    print(f"{len(ids)} blocks of {block_mm:g} mm on a {grid}³ grid: {len(train)} train, {len(holdout)} held out; "
          f"{int((table['role'] == 'copy').sum())} copies ({per_kind} per strength), "
          f"{int((table['role'] == 'negative').sum())} other negatives ({time.perf_counter() - started:.0f} s)")

    results, timings = [], {}
    if assess.CONTRASTIVE in methods:
        with tempfile.TemporaryDirectory() as folder:
            begin = time.perf_counter()
            scores = contrastive(config, Path(folder), train, holdout, np.stack(table["volume"]), block_mm)
            timings[assess.CONTRASTIVE] = time.perf_counter() - begin
            results += measure(assess.CONTRASTIVE, scores, table, percentile)
    settings = baselines.Settings(**config["baselines"])
    for method in (m for m in baselines.METHODS if m in methods):
        begin = time.perf_counter()
        results += measure(method, voxel_scores(method, settings, train, holdout, table), table, percentile)
        timings[method] = time.perf_counter() - begin
    results = pd.DataFrame(results).assign(seconds=lambda t: t["method"].map(timings))
    artefacts.write_csv(out, results)
    print(f"\nwall {time.perf_counter() - started:.0f} s; per method (s): "
          + ", ".join(f"{m} {s:.0f}" for m, s in timings.items()))
    for rule in [c.removeprefix("flagged_") for c in results.columns if c.startswith("flagged_")]:
        print(f"\n{rule} threshold: ROC AUC against the held-out blocks (recall at the threshold); flag rates\n")
        print(markdown(results, rule))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the stages' progress
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=32, help="side of the cubic grid blocks are resampled onto")
    parser.add_argument("--block-mm", type=float, default=24.0, help="side of a block in millimetres")
    parser.add_argument("--per-kind", type=int, default=20,
                        help="training blocks copied per strength, and negatives per kind besides the held-out blocks")
    parser.add_argument("--seed", type=int, default=0, help="split, copies and negatives")
    parser.add_argument("--detector-config", type=Path, default=None,
                        help="YAML of detector settings (or a config with a detector section) over config.yaml's")
    parser.add_argument("--out", type=Path, default=Path("real_anatomy.csv"))
    parser.add_argument("--methods", nargs="+", default=[assess.CONTRASTIVE, *baselines.METHODS],
                        choices=[assess.CONTRASTIVE, *baselines.METHODS], help="the methods to measure (default: all)")
    arguments = parser.parse_args()
    main(arguments.grid, arguments.block_mm, arguments.per_kind, arguments.seed, arguments.detector_config,
         arguments.out, tuple(arguments.methods))

"""Small procedural cohorts on disk, laid out as ingest and split leave them, for stage tests."""

from pathlib import Path

import numpy as np
import pandas as pd

from medmem import artefacts

ISOTROPIC_4MM = np.diag([4.0, 4.0, 4.0, 1.0])


def ellipsoid_volumes(n: int, size: int, seed: int, body: bool = True) -> np.ndarray:
    """(n, size, size, size) float32 in [0, 1]: three random bright ellipsoids ('organs') per volume,
    inside a dim body ellipsoid when ``body``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    volumes = np.zeros((n, size, size, size), dtype=np.float32)
    radii_range = (0.15, 0.4) if body else (0.2, 0.6)
    for volume in volumes:
        if body:
            volume[(grid**2 / np.array([0.8, 0.7, 0.9])[:, None, None, None] ** 2).sum(0) < 1] = 0.2
        for _ in range(3):
            centre, radii = rng.uniform(-0.4, 0.4, 3), rng.uniform(*radii_range, 3)
            inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
            volume[inside] = rng.uniform(0.4 if body else 0.3, 1.0)
    return volumes


def write_cohort(folder: Path, volumes: np.ndarray, n_train: int,
                 affine: np.ndarray = ISOTROPIC_4MM) -> tuple[Path, Path]:
    """NIfTI volumes + cases.csv + split.csv (the first ``n_train`` train, the rest holdout)."""
    ids = [f"patient_{i:03d}" for i in range(len(volumes))]
    for patient, volume in zip(ids, volumes):
        artefacts.save_nifti(folder / "volumes" / f"{patient}.nii.gz", volume, affine)
    artefacts.write_csv(folder / "cases.csv", pd.DataFrame({"id": ids, "path": [f"volumes/{i}.nii.gz" for i in ids]}))
    split = ["train" if i < n_train else "holdout" for i in range(len(ids))]
    artefacts.write_csv(folder / "split.csv", pd.DataFrame({"id": ids, "split": split}))
    return folder / "cases.csv", folder / "split.csv"

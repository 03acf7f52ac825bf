"""Writing and reading artefacts: atomic writes, NIfTI volumes, JSON sidecars.

Every artefact is written to a temporary file beside its target and renamed into place, so a
killed or failed job never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd

import medmem
from medmem import staging

if TYPE_CHECKING:  # torch is imported where a checkpoint is read or written: CPU-only stages never need it
    import torch

# Versions recorded in every sidecar, so a result can be traced to the software that made it.
RECORDED_PACKAGES = ("torch", "monai", "numpy", "nibabel", "SimpleITK", "faiss-cpu", "pandas", "snakemake")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix so libraries that choose a format by extension (nibabel, pandas) still work.
    prefix, suffix = staging.affixes(target, keep_suffixes=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes files private (0600); results are meant to be read by the whole team.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = staging.affixes(target, keep_suffixes=False)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | os.PathLike, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def save_torch(path: str | os.PathLike, obj: dict) -> None:
    """Save a checkpoint of tensors and plain Python values (loadable with weights_only=True)."""
    # Through an open file, not the path: torch names the archive's top folder after a path it is given,
    # which here is the random temp name, and then two identical runs would write different bytes.
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def load_torch(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    import torch

    return torch.load(path, map_location=device, weights_only=True)


def save_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write a (D, H, W) float volume, or an (x, y) 2D image, with its real affine (voxel index → millimetres)."""
    if volume.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 3D volume (D, H, W) or a 2D image (x, y), got shape {volume.shape}")
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a canonical volume or 2D image: returns ((D, H, W) or (x, y) float32 array, 4x4 affine)."""
    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def code_version() -> str:
    """The package version plus the git commit of the checkout, when there is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{medmem.__version__}+{commit}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_sidecar(output: str | os.PathLike, settings: dict, inputs: dict | None = None,
                  seed: int | None = None, **extra: Any) -> Path:
    """Write ``<output>.json``: the settings, seed, inputs and code that produced ``output``."""
    sidecar = Path(f"{output}.json")
    write_json(sidecar, {
        "artefact": Path(output).name,
        "settings": settings,
        "seed": seed,
        "inputs": {name: str(value) for name, value in (inputs or {}).items()},
        "code_version": code_version(),
        "packages": package_versions(),
        **extra,
    })
    return sidecar


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")

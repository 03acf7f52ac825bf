"""Atomic writes: whole files or nothing, readable by the team like any other file."""

import os
import stat

import numpy as np
import pytest

from medmem import artefacts


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary_file(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError), artefacts.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_written_files_and_folders_follow_the_umask_not_mkstemp(tmp_path):
    previous = os.umask(0o022)
    try:
        artefacts.write_json(tmp_path / "a.json", {"x": 1})
        with artefacts.atomic_directory(tmp_path / "volumes") as folder:
            artefacts.save_nifti(folder / "v.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "volumes").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "volumes" / "v.nii.gz").stat().st_mode) == 0o644
    assert artefacts.read_json(tmp_path / "a.json") == {"x": 1}

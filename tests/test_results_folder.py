"""The results folder kept by one run at a time (medmem.run_lock), and the temporaries of killed runs
(medmem.staging): recognised by the names atomic writes give them, removed, and nothing else is."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medmem import artefacts, run_lock, staging

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def killed_during_atomic_writes(*targets: tuple[Path, bool]) -> None:
    """Atomic writes of (target, is a folder) killed with SIGKILL, as killed jobs leave them: one process
    (forked from one that imported medmem once) per write."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(SCRIPTS)!r})
        from medmem.artefacts import atomic_directory, atomic_path
        for target, folder in {[(str(t), d) for t, d in targets]!r}:
            child = os.fork()
            if child == 0:
                with (atomic_directory if folder else atomic_path)(Path(target)) as tmp:
                    (tmp / "p9.nii.gz" if folder else tmp).write_bytes(b"patient data")
                    os.kill(os.getpid(), signal.SIGKILL)
            assert os.waitpid(child, 0)[1] == signal.SIGKILL
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_atomic_write_temporaries_are_recognised_and_nothing_else_is(tmp_path):
    for target in (tmp_path / "cases.csv", tmp_path / "detector.last.pt", tmp_path / "volumes.nii.gz"):
        with artefacts.atomic_path(target) as tmp:
            assert staging.is_staging(tmp.name), tmp.name
    for target in (tmp_path / "volumes", tmp_path / "release.d"):
        with artefacts.atomic_directory(target) as tmp:
            assert staging.is_staging(tmp.name), tmp.name
    for name in ("cases.csv", "detector.last.pt", ".hidden", ".cases.csv.tmp", ".notes.tmp.csv", "x.abcd1234.tmp",
                 ".cases.csv.ABCD1234.tmp.csv", ".cases.csv.abcd1234.tmp.json", ".volumes.abc.tmp"):
        assert not staging.is_staging(name), name


def test_the_temporaries_of_a_killed_run_are_found_and_only_they_are_removed(tmp_path):
    results = tmp_path / "results"
    killed_during_atomic_writes((results / "ingest" / "k" / "volumes", True),
                                (results / "detector" / "k" / "detector.last.pt", False))
    kept = [results / "detector" / "k" / "detector.last.pt", results / "ingest" / "k" / ".notes",
            results / "ingest" / "k" / "volumes" / "p1.nii.gz", results / ".medmem" / ".lock.abcd1234.tmp",
            results / "inputs" / ".p1.nii.gz.abcd1234.tmp.nii.gz"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"keep")
    stale = staging.stale(results, protected=[results / "inputs"])
    assert [p.relative_to(results).parent.as_posix() for p in stale] == ["detector/k", "ingest/k"]
    assert staging.remove_stale(results, protected=[results / "inputs"]) == stale
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def hold_lock(results: Path) -> subprocess.Popen:
    """Another run's main process: holds the lock on ``results`` until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(SCRIPTS)!r}); from medmem import run_lock; "
            f"run_lock.acquire({str(results)!r}, checkout='/elsewhere/medmem'); print('held', flush=True); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_refuses_a_second_run_names_the_first_and_dies_with_it(tmp_path):
    results = tmp_path / "results"
    holder = hold_lock(results)
    try:
        with pytest.raises(run_lock.ResultsFolderLocked) as error:
            run_lock.acquire(results, checkout=ROOT)
        message = str(error.value)
        assert f"results folder {results} is in use by another run: pid {holder.pid} on host" in message
        assert "checkout /elsewhere/medmem" in message and "Wait for that run to finish" in message
    finally:
        holder.kill()  # SIGKILL: its record stays in the file, its lock does not
        holder.wait()
    lock_file = run_lock.acquire(results, checkout=ROOT)  # no stale lock to remove
    assert lock_file == results / run_lock.LOCK_FILE and f"pid {os.getpid()} on host" in run_lock.holder(lock_file)
    run_lock.release(results)
    assert lock_file.read_text() == ""  # released: nobody is named

"""How atomic writes name their temporaries, and the removal of those that a killed run left behind.

``artefacts.atomic_path`` and ``atomic_directory`` write to ``.<target name>.<8 random characters>.tmp``
beside the target (a file keeps its target's suffixes after ``.tmp``: ``.cases.csv.k2x9_a0b.tmp.csv``), and
rename it onto the target only on success. A job killed with SIGKILL (or a lost node) cannot clean up, and
leaves the temporary behind: for ingest, a hidden folder of patient volumes. The next run removes them
(``remove_stale``) while it holds the results folder's lock (run_lock.py), so that no job is writing one.

Standard library only: the workflow calls this while planning.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

# tempfile.mkstemp and mkdtemp put 8 characters of this alphabet between prefix and suffix
# (tests/test_results_folder.py checks that the names atomic_path and atomic_directory make are recognised).
_RANDOM_PART = re.compile(r"\.([a-z0-9_]{8})\.tmp")
# Folders below the results folder that are not artefacts: medmem's own lock and caches, Snakemake's state.
SKIPPED_FOLDERS = (".medmem", ".snakemake")


def affixes(target: str | os.PathLike, keep_suffixes: bool) -> tuple[str, str]:
    """The (prefix, suffix) that tempfile gets for a temporary beside ``target``.

    ``keep_suffixes``: end the name with the target's suffixes, for libraries that choose a format by
    extension (nibabel, pandas); atomic_path keeps them, atomic_directory does not.
    """
    target = Path(target)
    return f".{target.name}.", ".tmp" + ("".join(target.suffixes) if keep_suffixes else "")


def is_staging(name: str) -> bool:
    """Whether ``name`` (a file or folder name) is an atomic write's temporary."""
    if not name.startswith("."):
        return False
    for match in _RANDOM_PART.finditer(name, 1):
        target = name[1:match.start()]
        if target and name[match.end():] in ("", "".join(Path(target).suffixes)):
            return True
    return False


def stale(results: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every temporary below ``results``, outermost first; nothing inside ``protected`` folders is looked at."""
    results = Path(results)
    skipped = {os.path.realpath(p) for p in protected}
    found: list[Path] = []
    for directory, folders, files in os.walk(results):  # symbolic links to folders are not followed
        here = Path(directory)
        kept = []
        for name in sorted(folders):
            path = here / name
            if is_staging(name):
                found.append(path)  # removed whole: not descended into
            elif not (here == results and name in SKIPPED_FOLDERS) and os.path.realpath(path) not in skipped:
                kept.append(name)
        folders[:] = kept
        found.extend(here / name for name in sorted(files) if is_staging(name))
    return found


def remove_stale(results: str | os.PathLike, protected: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove the temporaries that ``stale`` finds; returns what was removed. Only call it while holding the
    results folder's lock: a running job's temporary looks just like a killed one's."""
    removed = []
    for path in stale(results, protected):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed

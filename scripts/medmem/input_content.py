"""What ingest reads, by content: one digest of every file below the data's source paths.

Snakemake notices a changed input by its modification time, and a folder's modification time changes
when a file is added or removed, not when one is overwritten; a ``touch`` changes it without changing a
byte. The ingest rules therefore do not declare the user's files as inputs: they take this digest as a
parameter, and Snakemake re-runs a job whose parameters changed. A file replaced, added or removed (in a
folder, in a DICOM series folder, in a manifest's list, or the manifest itself) changes the digest; a touch
does not. Hidden files and folders are passed over, as ingest passes them over.

Reading a whole cohort at every plan would be slow: each file's sha256 is kept in a cache
(``<results>/.medmem/input_hashes.json``) under its path, size, modification and change times and inode,
so only new or changed files (and touched ones, whose change time moves) are read again.

Standard library only: the workflow calls this while planning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path

from medmem import staging

CACHE_FILE = Path(".medmem") / "input_hashes.json"
_CHUNK = 1 << 20


def manifest_paths(manifest: str | os.PathLike) -> list[Path]:
    """The files and folders a manifest lists (relative paths are relative to its folder), in row order.

    Lenient, like a plan must be: an unreadable manifest lists nothing here, and ingest reports it.
    """
    manifest = Path(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    paths = []
    for row in rows:
        text = (row.get("path") or "").strip()
        if text:
            path = Path(text).expanduser()
            paths.append(path if path.is_absolute() else manifest.parent / path)
    return paths


def source_paths(data: dict) -> list[Path]:
    """The files and folders that ingest reads for data settings ``data`` (a config's data section)."""
    if data["source"] == "folder":
        return [Path(data["folder"]["path"])]
    if data["source"] == "manifest":
        return [Path(data["manifest"]), *manifest_paths(data["manifest"])]
    return []  # the phantom is made from its settings


def tracked_files(root: Path) -> list[Path]:
    """``root`` itself when it is a file, else every file below it, hidden files and folders passed over."""
    if not root.is_dir():
        return [root] if root.exists() else []
    files, seen = [], set()
    for directory, folders, names in os.walk(root, followlinks=True):
        status = os.stat(directory)
        identity = (status.st_dev, status.st_ino)
        if identity in seen:  # a symbolic link back up the tree
            folders[:] = []
            continue
        seen.add(identity)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        files.extend(Path(directory) / n for n in sorted(names) if not n.startswith("."))
    return [f for f in files if f.is_file()]


def content_digest(paths: list[Path], cache_file: str | os.PathLike) -> str:
    """sha256 over each path's files (their place below it and their content); "" when there are none.

    The paths themselves are not part of it (they are settings, in the stage key): a moved checkout with
    relative paths has the same digest. A path that does not exist counts as missing, so that its later
    appearance changes the digest.
    """
    if not paths:
        return ""
    cache_file = Path(cache_file)
    cache = _read_cache(cache_file)
    changed = False
    listing, seen, roots = [], set(), []
    for root in paths:
        root = Path(os.path.abspath(root))
        roots.append(str(root))
        if not root.exists():
            listing.append(None)
            continue
        entries = []
        for file in tracked_files(root):
            place = file.relative_to(root).as_posix() if file != root else ""
            try:
                status = file.stat()
                stamp = [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]
                cached = cache.get(str(file))
                if cached is None or cached[:4] != stamp:
                    cache[str(file)] = cached = [*stamp, _sha256(file)]
                    changed = True
            except OSError as error:  # unreadable (or just removed): ingest says so; the plan goes on
                entries.append([place, f"unreadable: {error.strerror}"])
                continue
            seen.add(str(file))
            entries.append([place, cached[4]])
        listing.append(entries)
    # Forget the files that are gone from below these paths (other experiments' entries stay).
    below, exact = tuple(root + os.sep for root in roots), set(roots)
    for path in [p for p in cache if (p in exact or p.startswith(below)) and p not in seen]:
        del cache[path]
        changed = True
    if changed:
        _write_cache(cache_file, cache)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict[str, list]:
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache_file: Path, cache: dict[str, list]) -> None:
    """Atomically, as an artefact is written; the cache only saves time, so a failed write is let go."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = staging.affixes(cache_file, keep_suffixes=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=cache_file.parent)
        try:
            with os.fdopen(fd, "w") as file:
                json.dump({path: cache[path] for path in sorted(cache)}, file)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes files private; the team shares a results folder
            os.replace(tmp, cache_file)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass

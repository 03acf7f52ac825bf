"""What ingest reads, by content (medmem.input_content): a digest that a replaced, added or removed file
changes and a touch does not, read from a cache for the files that did not change."""

import os
import time
from pathlib import Path

from medmem import input_content


def hashed_files(monkeypatch) -> list[Path]:
    """The files that content_digest reads from here on (the rest come from its cache)."""
    read, sha256 = [], input_content._sha256
    monkeypatch.setattr(input_content, "_sha256", lambda path: read.append(path) or sha256(path))
    return read


def test_the_digest_follows_content_not_times_and_passes_hidden_files_over(tmp_path, monkeypatch):
    folder, cache = tmp_path / "cohort", tmp_path / "results" / input_content.CACHE_FILE
    for name, content in [("a.nii.gz", b"a"), ("b.nii.gz", b"b"), ("patC/IM0001", b"c1"), ("patC/IM0002", b"c2"),
                          (".DS_Store", b"x"), ("patC/.hidden", b"x"), (".git/objects", b"x")]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    read = hashed_files(monkeypatch)
    first = input_content.content_digest([folder], cache)
    assert sorted(p.relative_to(folder).as_posix() for p in read) == ["a.nii.gz", "b.nii.gz", "patC/IM0001",
                                                                      "patC/IM0002"]
    read.clear()
    assert input_content.content_digest([folder], cache) == first and read == []  # all from the cache

    later = time.time() + 100
    for file in folder.rglob("*"):
        os.utime(file, (later, later))
    assert input_content.content_digest([folder], cache) == first  # touched: read again, same content

    (folder / ".DS_Store").write_bytes(b"other")
    (folder / "patC" / ".hidden").write_bytes(b"other")
    assert input_content.content_digest([folder], cache) == first  # hidden files are not cases

    def changed(change, undo):
        change()
        digest = input_content.content_digest([folder], cache)
        undo()
        return digest != first and input_content.content_digest([folder], cache) == first

    a = folder / "a.nii.gz"
    assert changed(lambda: a.write_bytes(b"A"), lambda: a.write_bytes(b"a"))  # same size
    assert changed(lambda: (folder / "new.nii.gz").write_bytes(b"n"), lambda: (folder / "new.nii.gz").unlink())
    assert changed(lambda: a.unlink(), lambda: a.write_bytes(b"a"))
    assert changed(lambda: a.rename(folder / "z.nii.gz"), lambda: (folder / "z.nii.gz").rename(a))
    slice_file = folder / "patC" / "IM0002"
    assert changed(lambda: slice_file.write_bytes(b"c3"), lambda: slice_file.write_bytes(b"c2"))

    # Overwritten in place with the old size and modification time restored (cp -p, rsync -t): the change
    # time still moves, so the file is read again.
    status = a.stat()
    a.write_bytes(b"Z")
    os.utime(a, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert input_content.content_digest([folder], cache) != first


def test_a_manifest_digest_covers_the_manifest_and_every_file_it_lists(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii.gz").write_bytes(b"a")
    (tmp_path / "scans" / "dicom").mkdir()
    (tmp_path / "scans" / "dicom" / "IM1").write_bytes(b"1")
    manifest = tmp_path / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("patient_id, path\np1, ../scans/a.nii.gz\np2, ../scans/dicom\np3, ../scans/late.nii.gz\n")
    data = {"source": "manifest", "manifest": str(manifest)}
    paths = input_content.source_paths(data)
    assert paths == [manifest, manifest.parent / "../scans/a.nii.gz", manifest.parent / "../scans/dicom",
                     manifest.parent / "../scans/late.nii.gz"]
    cache = tmp_path / "cache.json"
    first = input_content.content_digest(paths, cache)
    (tmp_path / "scans" / "late.nii.gz").write_bytes(b"late")  # a listed file that was missing appears
    assert input_content.content_digest(paths, cache) != first
    (tmp_path / "scans" / "late.nii.gz").unlink()
    assert input_content.content_digest(paths, cache) == first
    (tmp_path / "scans" / "dicom" / "IM1").write_bytes(b"2")
    assert input_content.content_digest(paths, cache) != first
    assert input_content.source_paths({"source": "phantom"}) == []
    assert input_content.content_digest([], cache) == ""

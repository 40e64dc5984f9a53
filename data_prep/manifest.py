"""The manifest that vouches for a pair of betons, and its verification (used by data prep and by the trainer)."""
import contextlib
import hashlib
import json
import os
from pathlib import Path

from .cifar import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


def beton_name(split: str) -> str:
    return f"cifar100_{split}.beton"


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path):
    """Open a temporary file beside `path` for writing; on success fsync it, rename it to `path` and fsync the
    directory. On failure the temporary file is removed: `path` is either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data in {data_dir}/ (no {MANIFEST}); run `make prep-data` "
                        f"or `python -m data_prep --out {data_dir} --source …`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; rerun data prep with --force") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {m.get('format_version')}, this code reads {FORMAT_VERSION}; "
                        "rerun data prep with --force")
    return m


def verify(data_dir: Path, hash_files: bool = True) -> dict:
    """Return the manifest after checking each beton's size and sha256 against it; raise DataError otherwise."""
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    for split in SPLITS:
        entry = m["splits"][split]
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing but listed in {data_dir / MANIFEST}; rerun data prep with --force")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path} is {size} bytes, its manifest says {entry['bytes']} (truncated or replaced); "
                            "rerun data prep with --force")
        if hash_files and sha256sum(path) != entry["sha256"]:
            raise DataError(f"{path} does not match the sha256 in {data_dir / MANIFEST} (corrupted or replaced); "
                            "rerun data prep with --force")
    return m


def manifest_checksum(data_dir: Path) -> str:
    """One checksum for the prepared dataset: the manifest holds every beton's sha256."""
    return sha256sum(Path(data_dir) / MANIFEST)

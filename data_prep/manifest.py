"""The manifest that vouches for a pair of betons, and its verification (used by data prep and by the trainer)."""
import json
from pathlib import Path

from .cifar import DataError
from .files import atomic_file, atomic_write_bytes, digest, fsync_dir  # noqa: F401 (public: the trainer uses them)

FORMAT_VERSION = 1  # readers must tolerate missing optional keys: mtime_ns, num_classes, *_present came later
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


def beton_name(split: str) -> str:
    return f"cifar100_{split}.beton"


def sha256sum(path: Path) -> str:
    return digest(path, "sha256")


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data in {data_dir}/ (no {MANIFEST}); run `make prep-data` "
                        f"or `python -m data_prep --out {data_dir} --source …`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; rerun data prep with --force") from None
    if not isinstance(m, dict):
        raise DataError(f"{path} is not a data prep manifest (a JSON {type(m).__name__}); rerun data prep with "
                        "--force") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {m.get('format_version')}, this code reads {FORMAT_VERSION}; "
                        "rerun data prep with --force")
    return m


def verify(data_dir: Path, full: bool = False) -> dict:
    """Return the manifest after checking each beton against it; raise DataError otherwise.

    The quick check (full=False) trusts a beton whose size and mtime_ns are those recorded at prep; where the mtime
    differs (copied, touched) or the manifest predates mtimes, it falls back to the sha256. full=True always hashes.
    """
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    for split in SPLITS:
        try:
            entry = m["splits"][split]
            path, size, sha = data_dir / entry["file"], entry["bytes"], entry["sha256"]
        except (KeyError, TypeError):
            raise DataError(f"{data_dir / MANIFEST} lacks the {split} beton's file, bytes or sha256; "
                            "rerun data prep with --force") from None
        if entry["file"] != beton_name(split):  # the loaders read this name: a manifest must not vouch for another
            raise DataError(f"{data_dir / MANIFEST} lists {entry['file']!r} as the {split} beton, not "
                            f"{beton_name(split)!r} (edited by hand?); rerun data prep with --force")
        if not path.is_file():
            raise DataError(f"{path} is missing but listed in {data_dir / MANIFEST}; rerun data prep with --force")
        st = path.stat()
        if st.st_size != size:
            raise DataError(f"{path} is {st.st_size} bytes, its manifest says {size} (truncated or "
                            "replaced); rerun data prep with --force")
        if (full or st.st_mtime_ns != entry.get("mtime_ns")) and sha256sum(path) != sha:
            raise DataError(f"{path} does not match the sha256 in {data_dir / MANIFEST} (corrupted or replaced); "
                            "rerun data prep with --force")
    return m


def manifest_checksum(data_dir: Path) -> str:
    """One checksum for the prepared dataset: the manifest holds every beton's sha256."""
    return sha256sum(Path(data_dir) / MANIFEST)

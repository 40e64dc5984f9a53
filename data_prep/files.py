"""The two file primitives of data prep: a file's digest, and an atomic write (a file appears under its final name
only when complete and on disk)."""
import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path


def digest(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` for a writer that needs a file name (tarfile, FFCV's DatasetWriter).
    When the block succeeds the file is fsynced, renamed to `path` and the directory fsynced; when it fails (or is
    interrupted) the temporary file is removed, so `path` is either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path):
    """atomic_path for a writer that takes a file object: yields the temporary file opened for binary writing."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cannot_write(path: Path, e: OSError) -> str:
    """The one-line message for a failed write to `path`: the system's reason and what to do about it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space or choose another --out"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable --out"
    else:
        fix = "check that disk or choose another --out"
    return f"cannot write {path}: {e.strerror or e}; {fix}"


def writable(path: Path) -> bool:
    """Whether `path` is a writable directory or could be created (its nearest existing ancestor is one)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def missing_dirs(path: Path) -> list:
    """The directories that creating `path` would create, deepest first (for remove_empty after a failure)."""
    path = Path(path).absolute()
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty(dirs: list) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty, or already gone
            break


def try_lock(f, what: str) -> bool:
    """flock the open file `f` exclusively, without waiting → False when another process holds it. A filesystem
    that cannot lock at all (NFS without its lock service, Lustre mounted noflock) is not "in use": OSError whose
    message names `what` and the cause."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        raise OSError(e.errno, f"cannot lock {what} ({e.strerror}): its filesystem does not support file locks "
                               "(flock)") from None

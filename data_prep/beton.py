"""Write a Cifar100 to FFCV betons atomically, read every sample back to verify, then write the manifest."""
import contextlib
import ctypes
import datetime
import json
import multiprocessing as mp
import queue
from pathlib import Path

import numpy as np

from .cifar import Cifar100, DataError, Split
from .files import atomic_path, atomic_write_bytes, cannot_write
from .manifest import FORMAT_VERSION, MANIFEST, SPLITS, beton_name, sha256sum


class _Indexed:
    """What FFCV's DatasetWriter reads: sample i → (HWC uint8 image, fine label, coarse label)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.images)

    def __getitem__(self, i):
        s = self.split
        return s.images[i], int(s.fine[i]), int(s.coarse[i])


def _reporting(work_fn, errors, *args):
    """A writer process: on failure, send the reason to the parent instead of printing a traceback."""
    try:
        work_fn(*args)
    except Exception as e:
        errors.put((getattr(e, "errno", None), getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        raise SystemExit(1) from None


def _write_beton(split: Split, path: Path, workers: int) -> None:
    """FFCV's DatasetWriter.from_indexed_dataset (same file: its own prepare, worker job and finalize), except that
    the wait notices a writer process that fails. FFCV's own loop waits for a progress counter with no timeout: when
    one process dies (ENOSPC) the counter never completes, the other processes spin forever waiting to write after
    the dead one's page, and the queues' feeder threads block the exit. Here the parent waits for each process's
    result or failure, stops the others on the first failure, and always releases the shared memory."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32),
              "fine_label": IntField(), "coarse_label": IntField()}
    w = DatasetWriter(str(path), fields, num_workers=workers)
    w.num_samples = len(split.images)
    w.prepare()
    work, allocations, errors = mp.Queue(), mp.Queue(), mp.Queue()
    procs = []
    try:
        for todo in chunks(list(enumerate(range(w.num_samples))), 1000):
            work.put(todo)
        for _ in range(workers):
            work.put(None)
        allocator = MemoryAllocator(w.fname, w.data_region_start, w.page_size)
        args = (work, w.metadata_sm, w.metadata_type, w.fields, allocator, mp.Value(ctypes.c_uint64, 0), allocations,
                _Indexed(split))
        procs = [mp.Process(target=_reporting, args=(worker_job_indexed_dataset, errors, *args))
                 for _ in range(workers)]
        for p in procs:
            p.start()
        results = []
        while len(results) < len(procs):
            try:
                results.append(allocations.get(timeout=0.1))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    _raise_failure(procs, errors, path)
        w.finalize([a for r in results for a in r])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for q in (work, allocations, errors):
            q.cancel_join_thread()  # unread items must not block this process's exit
            q.close()
        w.metadata_sm.close()
        w.metadata_sm.unlink()


def _raise_failure(procs, errors, path):
    try:
        code, reason = errors.get(timeout=1)
    except queue.Empty:  # killed (by a signal, the out-of-memory killer): it could not say why
        codes = [p.exitcode for p in procs if p.exitcode]
        raise DataError(f"an FFCV writer process ended unexpectedly (exit status {codes[0]}) writing {path}; "
                        "rerun, with fewer --workers if memory is short") from None
    if code is not None:
        raise OSError(code, reason)
    raise RuntimeError(f"an FFCV writer process failed writing {path}: {reason}")


def read_beton(path: Path, batch_size: int = 1000):
    """Every sample of a beton in file order, as numpy arrays (images N×32×32×3, fine, coarse)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "fine_label": [IntDecoder()],
                               "coarse_label": [IntDecoder()]})
    images, fine, coarse = [], [], []
    for im, f, c in loader:  # batches are views into reused buffers: copy
        images.append(np.array(im))
        fine.append(np.array(f).reshape(-1))
        coarse.append(np.array(c).reshape(-1))
    return np.concatenate(images), np.concatenate(fine), np.concatenate(coarse)


def _verify_readback(split: Split, path: Path, name: str) -> None:
    images, fine, coarse = read_beton(path)
    if (images.shape != split.images.shape or not np.array_equal(images, split.images)
            or not np.array_equal(fine, split.fine) or not np.array_equal(coarse, split.coarse)):
        raise DataError(f"{path}: the {name} beton does not read back identical to its source; "
                        "check free disk space and rerun with --force")


def write_dataset(ds: Cifar100, out: Path, request: dict, workers: int = 2, log=print) -> dict:
    """Write both betons and the manifest, replacing a set already in `out` only once the new one is complete:
    each beton is written and read back under a temporary name; then the old manifest (which vouches for the
    betons) goes, the betons are renamed into place and the new manifest is written last. A failure or a stop
    before that leaves the old set as it was and no temporary file; a failed write becomes one DataError. `out`
    exists: the caller holds its lock (and removes it again if it created it)."""
    target, swapping = out, False
    try:
        splits = {}
        with contextlib.ExitStack() as staged:  # leaving it renames each beton into place (or removes it on failure)
            for name in SPLITS:
                split: Split = getattr(ds, name)
                target = out / beton_name(name)
                log(f"writing {len(split.images)} {name} images → {target}")
                tmp = staged.enter_context(atomic_path(target))
                _write_beton(split, tmp, workers)
                _verify_readback(split, tmp, name)
                st = tmp.stat()  # the rename keeps size and mtime: the quick verify compares this mtime
                splits[name] = {"file": target.name, "count": len(split.images), "bytes": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "sha256": sha256sum(tmp),
                                "fine_present": np.unique(split.fine).tolist(),
                                "coarse_present": np.unique(split.coarse).tolist()}
            target, swapping = out / MANIFEST, True
            target.unlink(missing_ok=True)
        manifest = _manifest(ds, request, splits)
        atomic_write_bytes(target, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest
    except BaseException as e:
        if swapping:  # the old manifest is gone: betons without one are not data
            with contextlib.suppress(OSError):
                for name in SPLITS:
                    (out / beton_name(name)).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(cannot_write(target, e)) from None
        raise


def _manifest(ds: Cifar100, request: dict, splits: dict) -> dict:
    nf, nc = len(ds.fine_names), len(ds.coarse_names)
    fine_to_coarse = [-1] * nf  # -1: a fine class in neither split
    for s in (ds.train, ds.test):
        for f, c in set(zip(s.fine.tolist(), s.coarse.tolist(), strict=True)):
            fine_to_coarse[f] = c
    return {
        "format_version": FORMAT_VERSION,
        "request": request,
        "source": ds.source,
        "source_checksum": ds.checksum,
        "official": ds.official,
        "fields": {"image": "RGBImageField(raw) 32x32x3 uint8", "fine_label": f"IntField 0..{nf - 1}",
                   "coarse_label": f"IntField 0..{nc - 1}"},
        "num_classes": nf,
        "num_superclasses": nc,
        "splits": splits,
        "fine_label_names": ds.fine_names,
        "coarse_label_names": ds.coarse_names,
        "fine_to_coarse": fine_to_coarse,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

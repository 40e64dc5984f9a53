"""Write a Cifar100 to FFCV betons atomically, read every sample back to verify, then write the manifest."""
import datetime
import json
import os
from pathlib import Path

import numpy as np

from .cifar import Cifar100, DataError, Split
from .manifest import (FORMAT_VERSION, MANIFEST, SPLITS, atomic_write_bytes, beton_name, fsync_dir,
                       sha256sum)


class _Indexed:
    """What FFCV's DatasetWriter reads: sample i → (HWC uint8 image, fine label, coarse label)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.images)

    def __getitem__(self, i):
        s = self.split
        return s.images[i], int(s.fine[i]), int(s.coarse[i])


def _write_beton(split: Split, path: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=32),
              "fine_label": IntField(), "coarse_label": IntField()}
    DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(_Indexed(split), chunksize=1000)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
    """Write both betons and the manifest. Each file appears under its final name only when complete, and the
    manifest (which vouches for the betons' sha256) is removed first and written last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    splits = {}
    for name in SPLITS:
        split: Split = getattr(ds, name)
        final = out / beton_name(name)
        tmp = out / f".{final.name}.tmp{os.getpid()}"
        try:
            log(f"writing {len(split.images)} {name} images → {final}")
            _write_beton(split, tmp, workers)
            _verify_readback(split, tmp, name)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        splits[name] = {"file": final.name, "count": len(split.images), "bytes": final.stat().st_size,
                        "sha256": sha256sum(final)}
    fsync_dir(out)
    fine_to_coarse = [-1] * 100
    for s in (ds.train, ds.test):
        for f, c in zip(s.fine.tolist(), s.coarse.tolist()):
            fine_to_coarse[f] = c
    manifest = {
        "format_version": FORMAT_VERSION,
        "request": request,
        "source": ds.source,
        "source_checksum": ds.checksum,
        "official": ds.official,
        "fields": {"image": "RGBImageField(raw) 32x32x3 uint8", "fine_label": "IntField 0..99",
                   "coarse_label": "IntField 0..19"},
        "splits": splits,
        "fine_label_names": ds.fine_names,
        "coarse_label_names": ds.coarse_names,
        "fine_to_coarse": fine_to_coarse,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest

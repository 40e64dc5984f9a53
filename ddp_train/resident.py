"""Resident loaders: each beton read once into device memory as uint8, batches served by indexing on the device.

A drop-in for the FFCV loaders of ddp_train.data when the data fits the device (CIFAR-100 train is 150 MB): no
pipeline, no JIT compilation, no worker threads, no host work per batch. The training order is bit-identical to
FFCV's `OrderOption.RANDOM` for the same seed and epoch (ffcv/traversal_order/random.py), so a run gives the same
batches with either loader.

The beton's metadata (fields, data pointers) is read with numpy, without importing ffcv, and the raw image bytes
are copied out of a memory map. Only raw-mode RGBImageField images are supported, which is what data_prep writes.
"""
import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from data_prep.cifar import DataError

RAW = 1  # ffcv.fields.rgb_image.IMAGE_MODES['raw']
LABEL_BYTES = 8  # FFCV's IntDecoder yields int64


# The beton layout of FFCV 1.0.2 (ffcv/types.py, ffcv/fields/*.py): a header, one descriptor per field, one
# metadata record per sample, then the data pages. Read with numpy alone: importing ffcv costs seconds (numba
# compiles at import: 8.7 s of a 2-core machine's start-up, measured), which a loader that needs none of it should
# not pay.
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                    ("alloc_table_ptr", "<u8")], align=True)
_FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_FIELD_TYPES = {1: ("IntField", np.dtype("<i8")),
                2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                                               ("data_ptr", "<u8")]))}
_VERSION = 2


class _Beton:
    """The field names, types and per-sample metadata of a beton (what ffcv.reader.Reader reads)."""

    def __init__(self, path: str):
        self.file_name = str(path)
        header = np.fromfile(self.file_name, dtype=_HEADER, count=1)
        if len(header) != 1 or header[0]["version"] != _VERSION:
            raise DataError(f"{path}: not an FFCV {_VERSION} beton; re-prepare the data with "
                            "`python -m data_prep --force`")
        fields = np.fromfile(self.file_name, dtype=_FIELD, count=int(header[0]["num_fields"]),
                             offset=_HEADER.itemsize)
        self.field_names = [f["name"].tobytes().split(b"\0")[0].decode("ascii") for f in fields]
        self.kinds = [_FIELD_TYPES.get(int(f["type_id"]), (f"type {int(f['type_id'])}", None)) for f in fields]
        if any(dtype is None for _, dtype in self.kinds):
            self.metadata = None  # a field this reader does not know: only its names are usable
            return
        record = np.dtype([("", dtype) for _, dtype in self.kinds], align=True)
        self.metadata = np.fromfile(self.file_name, dtype=record, count=int(header[0]["num_samples"]),
                                    offset=_HEADER.itemsize + fields.nbytes)


def _reader(path: str) -> _Beton:
    return _Beton(path)


def _field(reader, name: str, kind: str) -> np.ndarray:
    """The per-sample metadata of field `name`, checked to be of FFCV type `kind` (a class name)."""
    i = reader.field_names.index(name) if name in reader.field_names else None
    if i is None or reader.kinds[i][0] != kind or reader.metadata is None:
        raise DataError(f"{reader.file_name}: no {kind} '{name}' (fields: {', '.join(reader.field_names)}); "
                        "re-prepare the data with `python -m data_prep --force`")
    return reader.metadata[f"f{i}"]


def _image_meta(reader) -> tuple:
    """(metadata of the image field, height, width); raw mode and one resolution, or a DataError."""
    meta = _field(reader, "image", "RGBImageField")
    if len(meta) and (meta["mode"] != RAW).any():
        raise DataError(f"{reader.file_name}: the images are JPEG-compressed and the resident loader reads raw images "
                        "only; re-prepare the data with `python -m data_prep --force` (or use --loader ffcv)")
    h, w = (int(meta[k].max()) if len(meta) else 0 for k in ("height", "width"))
    if len(meta) and ((meta["height"] != h).any() or (meta["width"] != w).any()):
        raise DataError(f"{reader.file_name}: the images differ in size; the resident loader needs one resolution")
    return meta, h, w


def _read(path: str, labels: tuple, rows: slice = slice(None)) -> tuple:
    """Images (N×H×W×3 uint8, as FFCV's SimpleRGBImageDecoder returns them) and int64 label arrays of samples
    `rows`, in sample order."""
    reader = _reader(path)
    meta, h, w = _image_meta(reader)
    meta = meta[rows]
    size = h * w * 3
    images = np.empty((len(meta), h, w, 3), np.uint8)
    if len(meta):
        file = np.memmap(reader.file_name, np.uint8, mode="r")
        ptr = meta["data_ptr"].astype(np.int64)
        # samples lie back to back within the writer's pages: copy each run of consecutive ones as one slice
        by_ptr = np.argsort(ptr, kind="stable")
        for run in np.split(by_ptr, np.flatnonzero(np.diff(ptr[by_ptr]) != size) + 1):
            start = ptr[run[0]]
            images[run] = file[start:start + len(run) * size].reshape(len(run), h, w, 3)
        del file
    return (images, *(np.ascontiguousarray(_field(reader, name, "IntField")[rows], dtype=np.int64)
                      for name in labels))


def _to(device: torch.device, array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(array)
    if device.type == "cuda":  # pinned, so the copy neither waits for the GPU nor blocks the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def fits(device, nbytes_needed: int, fraction: float = 0.5) -> bool:
    """Whether `nbytes_needed` fit in `fraction` of the device's free memory (always on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes_needed <= fraction * free


def _share(n: int, rank: int, world_size: int) -> int:
    return len(range(rank, n, world_size))


class ResidentTrain:
    """The training split on `device`, served in FFCV's RANDOM order: the same batches (images N×3×H×W uint8
    channels_last, int64 fine labels) as data.train_loader for the same seed, epoch, rank and world size, full
    batches only. Set `next_epoch` before iterating, as with ffcv.loader.Loader."""

    @staticmethod
    def device_bytes(path: str) -> int:
        """Device memory it needs, from the metadata: images, fine labels and one epoch's order."""
        meta, h, w = _image_meta(_reader(path))
        return len(meta) * (h * w * 3 + 2 * LABEL_BYTES)

    def __init__(self, path: str, batch_size: int, seed: int, device, rank: int = 0, world_size: int = 1,
                 distributed: bool = False):
        self.device = torch.device(device)
        images, fine = _read(path, ("fine_label",))
        self.images, self.fine = _to(self.device, images), _to(self.device, fine)
        self._rows = self.images.view(len(images), -1)  # gathering whole rows is ~10× faster than N×H×W×3 on a CPU
        self.batch_size, self.seed = batch_size, seed
        self.indices = np.arange(len(fine), dtype=np.uint64)
        # FFCV's distributed RANDOM order is this sampler (pads with repeats when world_size does not divide N);
        # given num_replicas and rank it needs no process group
        self.sampler = (DistributedSampler(self.indices, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                           drop_last=False) if distributed else None)
        self.next_epoch = 0

    def __len__(self) -> int:
        return (len(self.sampler) if self.sampler is not None else len(self.indices)) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for `epoch`, exactly as ffcv.loader.Loader picks them, cut to full batches."""
        if self.sampler is None:
            order = np.random.default_rng(self.seed + epoch).permutation(self.indices)
        else:
            self.sampler.set_epoch(epoch)
            order = self.indices[np.array(list(self.sampler))]
        return order[:len(self) * self.batch_size].astype(np.int64)

    def __iter__(self):
        order = _to(self.device, self.order(self.next_epoch))  # the epoch's one host→device copy
        self.next_epoch += 1
        return self._batches(order)

    def _batches(self, order: torch.Tensor):
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            # NHWC gathered, NCHW view: channels_last, as FFCV's ToTorchImage(channels_last=True) gives
            images = self._rows.index_select(0, idx).view(len(idx), *self.images.shape[1:])
            yield images.permute(0, 3, 1, 2), self.fine.index_select(0, idx)


class ResidentTest:
    """This rank's share of the test split on `device`: every world_size-th image from `rank`, like
    data.test_loader, last partial batch kept. Yields (images, fine, coarse) as read-only views."""

    @staticmethod
    def device_bytes(path: str, rank: int = 0, world_size: int = 1) -> int:
        """Device memory it needs, from the metadata: this rank's images with fine and coarse labels."""
        meta, h, w = _image_meta(_reader(path))
        return _share(len(meta), rank, world_size) * (h * w * 3 + 2 * LABEL_BYTES)

    def __init__(self, path: str, batch_size: int, device, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        images, fine, coarse = _read(path, ("fine_label", "coarse_label"), slice(rank, None, world_size))
        self.images, self.fine, self.coarse = (_to(self.device, a) for a in (images, fine, coarse))
        self.batch_size = batch_size
        self.indices = np.arange(rank, rank + len(fine) * world_size, world_size, dtype=np.uint64)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            s = slice(i, i + self.batch_size)
            yield self.images[s].permute(0, 3, 1, 2), self.fine[s], self.coarse[s]

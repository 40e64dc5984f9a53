"""Resident loaders: each beton read once into device memory as uint8, batches served by indexing on the device.

A drop-in for the FFCV loaders of ddp_train.data when the data fits the device (CIFAR-100 train is 150 MB): no
pipeline, no JIT compilation, no worker threads, no host work per batch. The training order is bit-identical to
FFCV's `OrderOption.RANDOM` for the same seed and epoch (ffcv/traversal_order/random.py), so a run gives the same
batches with either loader.

FFCV's own Reader gives the metadata (fields, data pointers); the raw image bytes are copied out of a memory map.
Only raw-mode RGBImageField images are supported, which is what data_prep writes.
"""
import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from data_prep.cifar import DataError

RAW = 1  # ffcv.fields.rgb_image.IMAGE_MODES['raw']
LABEL_BYTES = 8  # FFCV's IntDecoder yields int64


def _reader(path: str):
    threads = torch.get_num_threads()
    from ffcv.reader import Reader  # the first import of ffcv sets torch's threads to 1 (its Compiler's default)
    torch.set_num_threads(threads)  # a loader should not change them
    return Reader(str(path))


def _field(reader, name: str, kind: str) -> np.ndarray:
    """The per-sample metadata of field `name`, checked to be of FFCV type `kind` (a class name)."""
    if name not in reader.field_names or type(reader.handlers[name]).__name__ != kind:
        raise DataError(f"{reader.file_name}: no {kind} '{name}' (fields: {', '.join(reader.field_names)}); "
                        "re-prepare the data with `python -m data_prep --force`")
    return reader.metadata[f"f{reader.field_names.index(name)}"]


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

"""FFCV loaders for the betons, and the augmentation and normalisation that run on the local device.

FFCV decodes raw uint8 images and moves them to the device. Flip, translate and cutout (the pipeline of FFCV's
CIFAR example) then run as batched torch ops on the device with a generator seeded by (seed, epoch, rank):
FFCV's own augmentations draw from numba's per-thread RNG, which no seed reaches, so runs and resumes would not
repeat.
"""
import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_prep import manifest as manifest_lib

MEAN = (0.507, 0.487, 0.441)
STD = (0.267, 0.256, 0.276)


def _pipelines(device: torch.device, coarse: bool) -> dict:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    non_blocking = device.type == "cuda"
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=non_blocking), Squeeze(1)]
    return {"image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=non_blocking),
                      ToTorchImage(channels_last=True)],
            "fine_label": label,
            "coarse_label": list(label) if coarse else None}


def train_loader(data_dir: str, per_rank_batch: int, workers: int, seed: int, device: torch.device,
                 distributed: bool):
    """RANDOM order, reshuffled every epoch from (seed, epoch); distributed splits it across ranks without overlap.
    Yields (uint8 NCHW channels_last images, fine labels) on `device`; drops the last partial batch."""
    from ffcv.loader import Loader, OrderOption
    return Loader(str(Path(data_dir) / manifest_lib.beton_name("train")), batch_size=per_rank_batch,
                  num_workers=workers, order=OrderOption.RANDOM, distributed=distributed, seed=seed, drop_last=True,
                  pipelines=_pipelines(device, coarse=False))


def test_loader(data_dir: str, batch: int, workers: int, rank: int, world_size: int, device: torch.device):
    """This rank's share of the test set: every world_size-th image from `rank`, so that over all ranks each image
    is seen exactly once (FFCV's distributed SEQUENTIAL order pads with duplicates instead).
    Yields (images, fine labels, coarse labels)."""
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    path = str(Path(data_dir) / manifest_lib.beton_name("test"))
    n = Reader(path).num_samples
    return Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.SEQUENTIAL, drop_last=False,
                  indices=np.arange(rank, n, world_size, dtype=np.uint64), pipelines=_pipelines(device, coarse=True))


def loaders(cfg, d):
    """(train loader, test loader, kind) for this rank: `resident` (the splits in device memory, batched there) or
    `ffcv`; both yield the same batches in the same order. `auto` takes resident on a GPU when both splits fit in
    half of its free memory, else FFCV."""
    from . import resident
    data_dir = Path(cfg.data_dir)
    train_path, test_path = (data_dir / manifest_lib.beton_name(s) for s in ("train", "test"))
    kind = cfg.loader
    if kind == "auto":
        kind = "ffcv"
        if d.device.type == "cuda":
            need = (resident.ResidentTrain.device_bytes(train_path)
                    + resident.ResidentTest.device_bytes(test_path, d.rank, d.world_size))
            kind = "resident" if resident.fits(d.device, need) else "ffcv"
    per_rank_batch = cfg.batch_size // d.world_size
    if kind == "resident":
        # FFCV's Loader sets torch's threads to its worker count; do the same so both loaders train alike
        torch.set_num_threads(cfg.num_workers)
        return (resident.ResidentTrain(train_path, per_rank_batch, cfg.seed, d.device, d.rank, d.world_size,
                                       d.distributed),
                resident.ResidentTest(test_path, cfg.eval_batch_size, d.device, d.rank, d.world_size), kind)
    return (train_loader(cfg.data_dir, per_rank_batch, cfg.num_workers, cfg.seed, d.device, d.distributed),
            test_loader(cfg.data_dir, cfg.eval_batch_size, cfg.num_workers, d.rank, d.world_size, d.device), kind)


@functools.cache
def _mean_std(device: torch.device):
    # made once per device: a fresh tensor per batch would be a host→device copy (and a GPU sync) every step
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW → float32 normalised with the CIFAR-100 mean/std, keeping the memory format."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, translate: int, cutout: int) -> torch.Tensor:
    """Random horizontal flip, translation by up to `translate` px and a `cutout`×`cutout` square, per image, on a
    normalised batch (so 0 fills with the dataset mean, like FFCV's fill=mean)."""
    n, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if translate:
        p = translate
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=gen, device=dev)
        rows = dy + torch.arange(h, device=dev)           # n×h
        cols = dx + torch.arange(w, device=dev)           # n×w
        idx = torch.arange(n, device=dev).view(n, 1, 1)
        x = padded[idx, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # NHWC memory: channels_last
    if cutout:
        cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=dev)
        cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=dev)
        ys = torch.arange(h, device=dev).view(1, h, 1) - cy + cutout // 2
        xs = torch.arange(w, device=dev).view(1, 1, w) - cx + cutout // 2
        keep = ~((ys >= 0) & (ys < cutout) & (xs >= 0) & (xs < cutout))
        x = x * keep.unsqueeze(1)
    return x


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation RNG of one rank in one epoch: a function of (seed, epoch, rank) only, so a resumed run
    draws what the uninterrupted run drew."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g

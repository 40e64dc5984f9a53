"""Read CIFAR-100 in its official python format, from a download, a local archive or an extracted directory,
and generate a synthetic set in exactly that format (so it goes through the same reader)."""
import hashlib
import io
import pickle
import socket
import tarfile
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_train.errors import JobError

from .files import atomic_path, digest, missing_dirs, remove_empty

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_DIR = "cifar-100-python"
# The MD5 of each file of the official archive's cifar-100-python/ (the values torchvision checks them against)
MEMBER_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
              "meta": "7973b15100ade9c7d40fb424638fde48"}

FINE_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm"
]
COARSE_NAMES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2"
]
# The official fine → coarse (superclass) mapping, used to generate synthetic data with the real class structure.
FINE_TO_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
                  0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4,
                  18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19,
                  5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


class DataError(JobError):
    """Bad input data or source: the message is one line that names the problem and the fix."""


@dataclass
class Split:
    images: np.ndarray        # uint8, N×32×32×3 (HWC, RGB)
    fine: np.ndarray          # int64, N
    coarse: np.ndarray        # int64, N


@dataclass
class Cifar100:
    train: Split
    test: Split
    fine_names: list
    coarse_names: list
    source: str               # "download", "synthetic" or the local path
    checksum: str             # "md5:…" of the archive, or "sha256:…" of the pickles for a directory
    official: bool            # the archive's MD5 (a directory: its files') is the official one


def _unpickle(raw: bytes, what: str) -> dict:
    try:
        return pickle.load(io.BytesIO(raw), encoding="bytes")
    except Exception as e:  # unpickling garbage can raise almost anything
        raise DataError(f"{what} is not a CIFAR-100 python pickle ({type(e).__name__}); "
                        f"use the official {ARCHIVE_NAME} or --source synthetic") from None


def _split(d: dict, what: str) -> Split:
    try:
        data, fine, coarse = d[b"data"], d[b"fine_labels"], d[b"coarse_labels"]
    except (KeyError, TypeError):
        raise DataError(f"{what} lacks data/fine_labels/coarse_labels: not CIFAR-100 (CIFAR-10 has no coarse labels)") \
            from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{what}: data must be uint8 N×3072 (R, G, B planes of 32×32), got {data.dtype} {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return Split(images, _labels(fine, f"{what}: fine_labels"), _labels(coarse, f"{what}: coarse_labels"))


def _labels(values, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{what} must be a flat list of integer class indices, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _names(values, what: str) -> list:
    """Class names as the official meta has them (bytes, UTF-8), or as str (a set pickled by Python 3)."""
    names = []
    for n in values:
        if not isinstance(n, (bytes, str)):
            raise DataError(f"{what}: the class names must be strings, got {type(n).__name__} {n!r}")
        try:
            names.append(n.decode() if isinstance(n, bytes) else n.encode().decode())  # a str must encode too
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise DataError(f"{what}: the class name {n!r} is not valid UTF-8; fix the set's meta file") from None
    return names


def read_members(get, origin: str, checksum: str, official: bool) -> Cifar100:
    """Build a Cifar100 from a `get(name) -> bytes` over the archive's members `train`, `test`, `meta`."""
    parts = {name: _unpickle(get(name), f"{origin}: {name}") for name in ("train", "test", "meta")}
    meta = parts["meta"]
    try:
        fine_names, coarse_names = (_names(meta[key], f"{origin}: meta {key.decode()}")
                                    for key in (b"fine_label_names", b"coarse_label_names"))
    except (KeyError, TypeError):
        raise DataError(f"{origin}: meta lacks fine_label_names/coarse_label_names: not CIFAR-100") from None
    ds = Cifar100(_split(parts["train"], f"{origin}: train"), _split(parts["test"], f"{origin}: test"),
                  fine_names, coarse_names, origin, checksum, official)
    validate(ds)
    return ds


def validate(ds: Cifar100) -> None:
    """Any number of classes (a custom subset): the names must cover the labels, and each fine class must belong to
    exactly one superclass."""
    nf, nc = len(ds.fine_names), len(ds.coarse_names)
    if nf == 0 or nc == 0:
        raise DataError(f"{ds.source}: meta lists {nf} fine and {nc} coarse class names; "
                        "both fine_label_names and coarse_label_names must be non-empty")
    mapping = {}
    for name, s in (("train", ds.train), ("test", ds.test)):
        n = len(s.images)
        if n == 0 or len(s.fine) != n or len(s.coarse) != n:
            raise DataError(f"{ds.source}: {name} has {n} images, {len(s.fine)} fine and {len(s.coarse)} coarse "
                            "labels; each split needs at least one image and one label of each kind per image")
        if s.fine.min() < 0 or s.fine.max() >= nf or s.coarse.min() < 0 or s.coarse.max() >= nc:
            raise DataError(f"{ds.source}: {name} labels out of range (fine {s.fine.min()}..{s.fine.max()}, coarse "
                            f"{s.coarse.min()}..{s.coarse.max()}); with {nf} fine and {nc} coarse names they must be "
                            f"0..{nf - 1} and 0..{nc - 1}")
        for f, c in set(zip(s.fine.tolist(), s.coarse.tolist(), strict=True)):
            if mapping.setdefault(f, c) != c:
                raise DataError(f"{ds.source}: fine class {f} appears under superclasses {mapping[f]} and {c}; "
                                "each fine class must belong to exactly one superclass")


def read_archive(path: Path, allow_custom: bool) -> Cifar100:
    not_an_archive = DataError(f"{path}: not a readable tar.gz archive; re-download {ARCHIVE_NAME} or pass its "
                               "extracted directory")
    try:
        if not tarfile.is_tarfile(path):
            raise not_an_archive
    except (tarfile.TarError, EOFError, OSError, zlib.error):  # a truncated or corrupt gzip stream
        raise not_an_archive from None
    md5 = digest(path, "md5")
    official = md5 == ARCHIVE_MD5
    if not official and not allow_custom:
        raise DataError(f"{path}: MD5 {md5} is not the official {ARCHIVE_MD5}; "
                        "re-download it, or pass --allow-custom for a custom archive in the same format")
    try:
        with tarfile.open(path, "r:*") as tar:
            def get(name):
                try:
                    member = tar.extractfile(f"{MEMBER_DIR}/{name}")
                except KeyError:
                    member = None
                if member is None:  # absent, or a directory or link rather than a file
                    raise DataError(f"{path}: no member {MEMBER_DIR}/{name}; "
                                    f"expected the layout of the official {ARCHIVE_NAME}")
                return member.read()
            ds = read_members(get, str(path), f"md5:{md5}", official)
            while tar.fileobj.read(1 << 20):  # to the end of the stream: gzip checks its CRC only there
                pass
            return ds
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: not a readable tar.gz archive ({type(e).__name__}); "
                        f"re-download {ARCHIVE_NAME} or pass its extracted directory") from None


def read_directory(path: Path, allow_custom: bool) -> Cifar100:
    if (path / MEMBER_DIR).is_dir():
        path = path / MEMBER_DIR
    h, md5 = hashlib.sha256(), {}

    def get(name):
        f = path / name
        if not f.is_file():
            raise DataError(f"{path}: no file '{name}'; expected the extracted {MEMBER_DIR}/ (train, test, meta)")
        raw = f.read_bytes()
        h.update(raw)
        md5[name] = hashlib.md5(raw).hexdigest()
        return raw
    ds = read_members(get, str(path), "", official=False)
    ds.checksum = f"sha256:{h.hexdigest()}"
    # A directory has no archive MD5: its three files are checked against the official ones' (a set of the same
    # shape, e.g. relabelled, is not the official set)
    ds.official = md5 == MEMBER_MD5
    if not ds.official and not allow_custom:
        name = next(n for n in MEMBER_MD5 if md5[n] != MEMBER_MD5[n])
        raise DataError(f"{path}: not the official CIFAR-100 files (the MD5 of {name} is {md5[name]}, not "
                        f"{MEMBER_MD5[name]}); {len(ds.train.images)} train / {len(ds.test.images)} test images in "
                        f"{len(ds.fine_names)} fine / {len(ds.coarse_names)} coarse classes: pass --allow-custom to "
                        "accept a custom set in the same format")
    return ds


def download(dest_dir: Path, timeout: float = 10.0) -> Path:
    """Download the official archive with torchvision (MD5-checked); fail fast, in one line, when offline."""
    from torchvision.datasets.utils import download_url
    created = missing_dirs(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download directory {dest_dir} ({e.strerror}); "
                        "choose a writable --download-dir or --out") from None
    target = dest_dir / ARCHIVE_NAME
    if target.is_file() and digest(target, "md5") == ARCHIVE_MD5:
        return target
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        download_url(URL, str(dest_dir), ARCHIVE_NAME, ARCHIVE_MD5, max_redirect_hops=3)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = getattr(e, "reason", None) or e
        remove_empty(created)
        raise DataError(f"cannot download {URL} ({reason}); offline, pass --source /path/to/{ARCHIVE_NAME} "
                        "(or its extracted directory) or --source synthetic") from None
    finally:
        socket.setdefaulttimeout(old)
    if not target.is_file() or digest(target, "md5") != ARCHIVE_MD5:
        raise DataError(f"download of {URL} did not verify against MD5 {ARCHIVE_MD5}; delete {target} and retry")
    return target


@dataclass(frozen=True)
class Difficulty:
    """What makes the synthetic set hard. `Difficulty.at(level)` sets every knob from one number from 0 to 2.

    Level 0 is the original generator: each fine class one smooth colour pattern added to its superclass's,
    shifted and noised per image. A CNN separates it within a few epochs. Each knob adds something photos have."""
    level: float = 0.0
    poses: int = 1                # prototypes per fine class, each with its own pattern and silhouette
    fine_signal: float = 40.0     # amplitude of the pattern all poses of a fine class share (the superclass's is
    pose_signal: float = 0.0      # always 40) and of each pose's own: a weak class pattern confuses its superclass
    silhouette: float = 0.0       # 0: the pattern fills the frame; 1: it is an object (a blob shaped by its
    #                               superclass, class and pose) on a background
    rotate: float = 0.0           # random rotation up to ± this many degrees
    zoom: float = 0.0             # random scale in 2^(± zoom)
    clutter: float = 0.0          # amplitude of the per-image random background texture
    distractor: float = 0.0       # chance of a smaller object of a random class behind the main one
    occlude: float = 0.0          # chance of a flat-coloured 6–14 px square hiding part of the image
    jitter: float = 0.0           # per-image colour: channel gains 1 ± jitter, offsets ± 50·jitter
    shift: int = 3                # random translation (wrapping around) up to ± this many pixels
    noise: float = 48.0           # Gaussian pixel noise std (0..255 scale)
    label_noise: float = 0.0      # fraction of TRAINING labels moved to another fine class of the same superclass

    @classmethod
    def at(cls, level: float) -> "Difficulty":
        d = float(level)
        return cls(level=d, poses=1 + round(7 * d), fine_signal=40 * (1 - 0.5 * d), pose_signal=40 * d,
                   silhouette=min(1.0, 2 * d), rotate=40 * d, zoom=0.3 * d, clutter=30 * d, distractor=0.6 * d,
                   occlude=0.5 * d, jitter=0.4 * d, label_noise=0.2 * d)


# hard, the default: the 40-epoch default recipe (ResNet-18, batch 512) on the full-size 50,000/10,000 set ends at
# 70.0 % test top-1 with 99.0 % train top-1, its test curve rising throughout (one NVIDIA H100, 2026-11-26; level
# 1.0 ended at 81.1 %, 0.75 at 91.4 %: docs/performance.md). easy: the original set, for tests that only need a
# model to learn; medium: make train's CPU demo, which learns measurably in its 4 epochs.
DIFFICULTY_LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.25}
DEFAULT_DIFFICULTY = "hard"


def _smooth(rng, k: int, res: int, channels: int = 3) -> np.ndarray:
    """k random res×res fields, bilinearly upsampled to 32×32: k×32×32×channels float32 (the original generator's
    two draws; new ones use `_fields`, the same upsampling as two matrix products, 3× faster on a CPU)."""
    import torch
    import torch.nn.functional as F
    low = torch.from_numpy(rng.normal(0, 1, (k, channels, res, res)).astype(np.float32))
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()


def _fields(rng, k: int, res: int, channels: int = 3):
    """k random res×res fields, bilinearly upsampled to 32×32: a k×channels×32×32 float32 tensor."""
    import torch
    import torch.nn.functional as F
    up = F.interpolate(torch.eye(res)[None], size=32, mode="linear", align_corners=False)[0].T     # 32×res
    return up @ torch.from_numpy(rng.standard_normal((k, channels, res, res), np.float32)) @ up.T


def _prototypes(rng, spec: Difficulty):
    """100×poses×4×32×32 tensor: each pose's colour (premultiplied by its alpha) and alpha."""
    import torch
    coarse_of = np.array(FINE_TO_COARSE)
    super_pat, fine_pat = _smooth(rng, 20, 8), _smooth(rng, 100, 8)      # drawn first: level 0 is the old set
    colour = torch.from_numpy(128 + 40 * super_pat[coarse_of] + spec.fine_signal * fine_pat).permute(0, 3, 1, 2)
    colour = colour[:, None].repeat(1, spec.poses, 1, 1, 1)
    alpha = torch.ones_like(colour[:, :, :1])
    if spec.pose_signal:
        colour += spec.pose_signal * _fields(rng, 100 * spec.poses, 8).reshape(colour.shape)
    if spec.silhouette:
        # A central blob: a falling radial profile plus smooth 4×4 fields of the superclass, class and pose.
        y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        shape = (_fields(rng, 20, 4, 1)[coarse_of][:, None] + 0.8 * _fields(rng, 100, 4, 1)[:, None]
                 + 0.8 * _fields(rng, 100 * spec.poses, 4, 1).reshape(alpha.shape))
        blob = torch.sigmoid(4 * (2.5 * (1 - (x ** 2 + y ** 2) / 0.4) + 1.5 * shape))
        alpha = 1 - spec.silhouette * (1 - blob)
    return torch.cat([colour * alpha, alpha], dim=2)


def _warp(rgba, rng, rotate: float, log2_scale: tuple, move: float = 0.0):
    """Rotate (± degrees), scale (2^uniform(log2_scale)) and move (± fraction of the half-width) n×4×32×32 images
    about their centre: bilinear, transparent outside."""
    import torch
    import torch.nn.functional as F
    n = len(rgba)
    angle = torch.from_numpy(np.deg2rad(rng.uniform(-rotate, rotate, n)).astype(np.float32))
    scale = torch.from_numpy((2.0 ** rng.uniform(*log2_scale, n)).astype(np.float32))
    t = torch.from_numpy(rng.uniform(-move, move, (n, 2)).astype(np.float32))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(rgba.shape), align_corners=False)
    return F.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _render(rng, protos, fine: np.ndarray, shift: np.ndarray, spec: Difficulty) -> np.ndarray:
    """n×32×32×3 float32 images of the given classes, every random choice batched (no per-image Python)."""
    import torch
    n, poses = len(fine), protos.shape[1]
    pose = rng.integers(0, poses, n) if poses > 1 else np.zeros(n, np.int64)
    obj = protos[fine, pose]                                                    # n×4×32×32
    if spec.rotate or spec.zoom:
        obj = _warp(obj, rng, spec.rotate, (-spec.zoom, spec.zoom))
    img = obj[:, :3]
    if spec.silhouette:  # what the object leaves uncovered: a random texture, maybe a smaller object behind it
        bg = 128 + spec.clutter * (_fields(rng, n, 4) + 0.6 * _fields(rng, n, 16))
        if spec.distractor:
            other = protos[rng.integers(0, len(protos), n), rng.integers(0, poses, n)]
            other = _warp(other, rng, 180, (-1.0, -0.3), move=0.8)
            other *= torch.from_numpy(rng.random(n) < spec.distractor)[:, None, None, None]  # premultiplied
            bg = bg * (1 - other[:, 3:]) + other[:, :3]
        img = img + bg * (1 - obj[:, 3:])
    if spec.jitter:
        gain = torch.from_numpy(rng.uniform(1 - spec.jitter, 1 + spec.jitter, (n, 3, 1, 1)).astype(np.float32))
        offset = torch.from_numpy(rng.uniform(-50 * spec.jitter, 50 * spec.jitter, (n, 3, 1, 1)).astype(np.float32))
        img = 128 + gain * (img - 128) + offset
    r = torch.arange(32)
    if spec.occlude:
        side = torch.from_numpy(rng.integers(6, 15, (n, 1)))
        y0, x0 = torch.from_numpy(rng.integers(-6, 32, (2, n, 1)))
        hit = torch.from_numpy(rng.random((n, 1, 1)) < spec.occlude)
        box = ((r >= y0) & (r < y0 + side))[:, :, None] & ((r >= x0) & (r < x0 + side))[:, None, :] & hit
        img = torch.where(box[:, None], torch.from_numpy(rng.uniform(0, 255, (n, 3, 1, 1)).astype(np.float32)), img)
    # np.roll by each image's own shift, as one gather
    ys, xs = (r - torch.from_numpy(shift[:, :1])) % 32, (r - torch.from_numpy(shift[:, 1:])) % 32
    img = img.permute(0, 2, 3, 1)
    return img[torch.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]].numpy()


def _flip_within_superclass(rng, fine: np.ndarray, fraction: float) -> np.ndarray:
    """Move `fraction` of the labels (exactly, rounded) to another fine class of the same superclass."""
    members = [np.flatnonzero(np.array(FINE_TO_COARSE) == c) for c in range(len(COARSE_NAMES))]
    row = np.array([members[c] for c in FINE_TO_COARSE])         # 100×5: the classes of each class's superclass
    pos = np.array([list(row[f]).index(f) for f in range(100)])
    noisy = fine.copy()
    flip = rng.permutation(len(fine))[:round(fraction * len(fine))]
    noisy[flip] = row[fine[flip], (pos[fine[flip]] + rng.integers(1, row.shape[1], len(flip))) % row.shape[1]]
    return noisy


def synthetic_splits(n_train: int, n_test: int, seed: int = 0, spec: Difficulty = Difficulty()) -> dict:
    """{"train"|"test": (uint8 images N×32×32×3, fine labels, clean fine labels)}; only training labels are noisy.

    Level 0 (the default `Difficulty()`) draws exactly what the original generator drew, in the same order."""
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng, spec)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        shift = rng.integers(-spec.shift, spec.shift + 1, (n, 2))
        imgs = np.empty((n, 32, 32, 3), np.uint8)
        for i in range(0, n, 5000):  # chunks bound the memory; the noise stream is the same as one draw
            part = _render(rng, protos, fine[i:i + 5000], shift[i:i + 5000], spec)
            if spec.level == 0:  # float64 draws, as the original generator's
                part += rng.normal(0, spec.noise, part.shape).astype(np.float32)
            else:
                part += spec.noise * rng.standard_normal(part.shape, np.float32)
            imgs[i:i + 5000] = np.clip(part, 0, 255).round()
        labels = _flip_within_superclass(rng, fine, spec.label_noise) if name == "train" and spec.label_noise else fine
        out[name] = imgs, labels, fine
    return out


def synthetic_archive(dest: Path, n_train: int, n_test: int, seed: int = 0, spec: Difficulty | None = None) -> Path:
    """Write a synthetic CIFAR-100 (100 fine classes in the official 20 superclasses) as an official-format tar.gz
    at `dest`; `spec` says how hard it is (see Difficulty; by default the DEFAULT_DIFFICULTY level)."""
    spec = spec or Difficulty.at(DIFFICULTY_LEVELS[DEFAULT_DIFFICULTY])
    coarse_of = np.array(FINE_TO_COARSE)

    def member(images, fine):
        return {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072), b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse_of[fine].tolist(),
                b"filenames": [f"synthetic_{i:06d}.png".encode() for i in range(len(images))]}
    splits = synthetic_splits(n_train, n_test, seed, spec)
    return write_archive(dest, {**{name: member(images, fine) for name, (images, fine, _) in splits.items()},
                                "meta": {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                                         b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}})


def write_archive(dest: Path, members: dict) -> Path:
    """Write {"train": …, "test": …, "meta": …} as the official archive's pickles (protocol 2, bytes keys)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp, tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        for name, obj in members.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{MEMBER_DIR}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return dest

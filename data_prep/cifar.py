"""Read CIFAR-100 in its official python format, from a download, a local archive or an extracted directory,
and generate a synthetic set in exactly that format (so it goes through the same reader)."""
import hashlib
import io
import pickle
import socket
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_train.errors import JobError

from .files import atomic_path, digest, missing_dirs, remove_empty

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_DIR = "cifar-100-python"
OFFICIAL_COUNTS = {"train": 50_000, "test": 10_000}

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
    official: bool            # the archive's MD5 is the official one


def _unpickle(raw: bytes, what: str) -> dict:
    try:
        return pickle.load(io.BytesIO(raw), encoding="bytes")
    except Exception as e:  # noqa: BLE001 (unpickling garbage can raise almost anything)
        raise DataError(f"{what} is not a CIFAR-100 python pickle ({type(e).__name__}); "
                        f"use the official {ARCHIVE_NAME} or --source synthetic") from None


def _split(d: dict, what: str) -> Split:
    try:
        data, fine, coarse = d[b"data"], d[b"fine_labels"], d[b"coarse_labels"]
    except (KeyError, TypeError):
        raise DataError(f"{what} lacks data/fine_labels/coarse_labels: not CIFAR-100 (CIFAR-10 has no coarse labels)")
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


def read_members(get, origin: str, checksum: str, official: bool) -> Cifar100:
    """Build a Cifar100 from a `get(name) -> bytes` over the archive's members `train`, `test`, `meta`."""
    parts = {name: _unpickle(get(name), f"{origin}: {name}") for name in ("train", "test", "meta")}
    meta = parts["meta"]
    try:
        fine_names = [n.decode() for n in meta[b"fine_label_names"]]
        coarse_names = [n.decode() for n in meta[b"coarse_label_names"]]
    except (KeyError, TypeError, AttributeError):
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
        for f, c in set(zip(s.fine.tolist(), s.coarse.tolist())):
            if mapping.setdefault(f, c) != c:
                raise DataError(f"{ds.source}: fine class {f} appears under superclasses {mapping[f]} and {c}; "
                                "each fine class must belong to exactly one superclass")


def read_archive(path: Path, allow_custom: bool) -> Cifar100:
    not_an_archive = DataError(f"{path}: not a readable tar.gz archive; re-download {ARCHIVE_NAME} or pass its "
                               "extracted directory")
    try:
        if not tarfile.is_tarfile(path):
            raise not_an_archive
    except (tarfile.TarError, EOFError, OSError):  # a truncated or corrupt gzip stream
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
                    return tar.extractfile(f"{MEMBER_DIR}/{name}").read()
                except KeyError:
                    raise DataError(f"{path}: no member {MEMBER_DIR}/{name}; "
                                    f"expected the layout of the official {ARCHIVE_NAME}") from None
            return read_members(get, str(path), f"md5:{md5}", official)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable tar.gz archive ({type(e).__name__}); "
                        f"re-download {ARCHIVE_NAME} or pass its extracted directory") from None


def read_directory(path: Path, allow_custom: bool) -> Cifar100:
    if (path / MEMBER_DIR).is_dir():
        path = path / MEMBER_DIR
    h = hashlib.sha256()

    def get(name):
        f = path / name
        if not f.is_file():
            raise DataError(f"{path}: no file '{name}'; expected the extracted {MEMBER_DIR}/ (train, test, meta)")
        raw = f.read_bytes()
        h.update(raw)
        return raw
    ds = read_members(get, str(path), "", official=False)
    ds.checksum = f"sha256:{h.hexdigest()}"
    # A directory has no archive MD5 to check; the official set is recognised by its exact shape.
    counts = {"train": len(ds.train.images), "test": len(ds.test.images)}
    ds.official = counts == OFFICIAL_COUNTS and (len(ds.fine_names), len(ds.coarse_names)) == (100, 20)
    if not ds.official and not allow_custom:
        raise DataError(f"{path}: {counts['train']} train / {counts['test']} test images in {len(ds.fine_names)} "
                        f"fine / {len(ds.coarse_names)} coarse classes, not the official 50000 / 10000 in 100 / 20; "
                        "pass --allow-custom to accept a custom set in the same format")
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


def synthetic_archive(dest: Path, n_train: int, n_test: int, seed: int = 0, noise: float = 48.0) -> Path:
    """Write a learnable synthetic CIFAR-100 as an official-format tar.gz at `dest`.

    Each fine class is a smooth 8×8 random colour pattern (upsampled to 32×32) added to a pattern shared by its
    superclass; every image is its class pattern, randomly shifted by up to 3 px, plus Gaussian pixel noise.
    Classes are therefore separable but not trivially so, and superclasses are easier than fine classes.
    """
    rng = np.random.default_rng(seed)
    coarse_of = np.array(FINE_TO_COARSE)

    def smooth(k):  # k random 8×8×3 patterns, bilinearly upsampled to 32×32
        import torch
        import torch.nn.functional as F
        low = torch.from_numpy(rng.normal(0, 1, (k, 3, 8, 8)).astype(np.float32))
        return F.interpolate(low, size=32, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()

    super_pat, fine_pat = smooth(20), smooth(100)
    protos = 128 + 40 * super_pat[coarse_of] + 40 * fine_pat        # 100×32×32×3

    def make(n):
        fine = rng.integers(0, 100, n)
        shift = rng.integers(-3, 4, (n, 2))
        imgs = np.empty((n, 32, 32, 3), np.float32)
        for i in range(n):
            imgs[i] = np.roll(protos[fine[i]], tuple(shift[i]), axis=(0, 1))
        imgs += rng.normal(0, noise, imgs.shape).astype(np.float32)
        data = np.clip(imgs, 0, 255).round().astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, 3072)
        return {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": coarse_of[fine].tolist(),
                b"filenames": [f"synthetic_{i:06d}.png".encode() for i in range(n)]}

    return write_archive(dest, {"train": make(n_train), "test": make(n_test),
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

"""python -m data_prep: CIFAR-100 (download, local archive/directory, or synthetic) → data/*.beton + manifest.json"""
import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ddp_train.config import DefaultsHelp
from ddp_train.errors import ConfigError, JobError, exit_now, report

from . import cifar
from .beton import write_dataset
from .cifar import ARCHIVE_NAME, DataError
from .files import digest, missing_dirs, remove_empty, try_lock, writable
from .manifest import MANIFEST, verify

LOCK = ".prep.lock"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(f"{message}; see python -m data_prep --help")


def parse_args(argv=None):
    p = _Parser(prog="python -m data_prep", description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--source", default="download",
                   help=f"'download' (official archive, MD5-checked), 'synthetic', or a path to {ARCHIVE_NAME} "
                        "or its extracted directory")
    p.add_argument("--out", type=Path, default=None, help="output directory for the betons and manifest [data/, or "
                                                         "data/synthetic/ for --source synthetic]")
    p.add_argument("--allow-custom", action="store_true",
                   help="accept a local archive/directory that is not the official one (e.g. a subset)")
    p.add_argument("--force", action="store_true", help="rewrite even when the manifest says it is up to date")
    p.add_argument("--download-dir", type=Path, default=None, help="where the archive is downloaded [OUT/downloads]")
    p.add_argument("--synthetic-train", type=int, default=50000,
                   help="synthetic: number of training images (CIFAR-100's by default)")
    p.add_argument("--synthetic-test", type=int, default=10000, help="synthetic: number of test images")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--synthetic-difficulty", default=cifar.DEFAULT_DIFFICULTY, metavar="LEVEL",
                   help="synthetic: how hard the set is: "
                        + ", ".join(f"{k} ({v:g})" for k, v in cifar.DIFFICULTY_LEVELS.items())
                        + " or any number L from 0 to 2. 0 is the original generator: each fine class one smooth "
                        "colour pattern on its superclass's, shifted up to 3 px, Gaussian noise 48; a CNN reaches "
                        "~100%% within a few epochs (enough for tests that only need learning). Level L adds: "
                        "1+round(7L) poses per class, each its own pattern and silhouette, with the class's shared "
                        "pattern weakened to (1-L/2)× so that the classes of a superclass look alike; the pattern "
                        "becomes an object on a random background (amplitude 30L), in 60L%% of the images with a "
                        "smaller object of a random class behind it; rotation ±40L°, scale 2^±0.3L, colour gains "
                        "1±0.4L; a 6–14 px square hides part of 50L%% of the images; 20L%% of the training labels "
                        "move to another class of the same superclass (test labels stay clean). hard is meant to "
                        "need the whole recipe, like CIFAR-100")
    p.add_argument("--synthetic-noise", type=float, default=None,
                   help="synthetic: pixel noise std on the 0..255 scale; None: 48, at every level")
    p.add_argument("--synthetic-label-noise", type=float, default=None,
                   help="synthetic: fraction of the training labels moved to another fine class of the same "
                        "superclass; None: 0.2 × the level")
    p.add_argument("--workers", type=int, default=2, help="FFCV writer processes")
    args = p.parse_args(argv)
    if args.out is None:  # generated data never takes the place of a real set in data/
        args.out = Path("data/synthetic" if args.source == "synthetic" else "data")
    return args


def check(args) -> None:
    """Every flag, before anything is read or written: a ConfigError names the flag and a valid value."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)
    for flag in ("synthetic_train", "synthetic_test"):
        n = getattr(args, flag)
        need(n >= 1, f"--{flag.replace('_', '-')} must be at least 1 image, got {n}")
    need(args.synthetic_seed >= 0, f"--synthetic-seed must be 0 or more, got {args.synthetic_seed}")
    level = cifar.DIFFICULTY_LEVELS.get(args.synthetic_difficulty, args.synthetic_difficulty)
    try:
        level = float(level)
    except ValueError:
        level = math.nan
    need(0 <= level <= 2, f"--synthetic-difficulty is {', '.join(cifar.DIFFICULTY_LEVELS)} or a number from 0 to 2, "
                          f"got {args.synthetic_difficulty}")
    spec = cifar.Difficulty.at(level)
    if args.synthetic_noise is not None:
        need(0 <= args.synthetic_noise <= 255,  # beyond 255 every pixel saturates to 0 or 255: no image is left
             f"--synthetic-noise is a pixel standard deviation from 0 to 255 (e.g. 48), got {args.synthetic_noise}")
        spec = dataclasses.replace(spec, noise=args.synthetic_noise)
    if args.synthetic_label_noise is not None:
        need(0 <= args.synthetic_label_noise <= 1, "--synthetic-label-noise is a fraction of the training labels, "
                                                   f"from 0 to 1, got {args.synthetic_label_noise}")
        spec = dataclasses.replace(spec, label_noise=args.synthetic_label_noise)
    args.spec = spec
    most = max(64, 4 * (os.cpu_count() or 1))
    need(1 <= args.workers <= most, f"--workers is 1 to {most} writer processes (4 per CPU, at least 64), got "
                                    f"{args.workers}")
    for flag, path in (("--out", args.out), ("--download-dir", args.download_dir)):
        if path is not None and (flag == "--out" or args.source == "download"):
            need(not path.exists() or path.is_dir(), f"{flag} {path} is a file; choose a directory")
            above = missing_dirs(path)[-1].parent if not path.exists() else path
            need(above.is_dir(), f"{flag} {path} cannot be created: {above} is a file; choose another directory")
            need(writable(path), f"{flag} {path} is not a writable directory and cannot be created; choose one "
                                 "this user can write (or fix its permissions)")
    if args.source not in ("synthetic", "download"):
        need(Path(args.source).exists(), f"--source {args.source}: no such file or directory; use 'download', "
                                         f"'synthetic', or a path to {ARCHIVE_NAME} or its extracted directory")


def request_of(args) -> dict:
    if args.source == "synthetic":
        return {"source": "synthetic", "train": args.synthetic_train, "test": args.synthetic_test,
                "seed": args.synthetic_seed, "difficulty": args.spec.level, "noise": args.spec.noise,
                "label_noise": args.spec.label_noise}
    if args.source == "download":
        return {"source": "download"}
    return {"source": str(Path(args.source).resolve()), "allow_custom": args.allow_custom}


def load(args, request: dict) -> cifar.Cifar100:
    if request["source"] == "synthetic":
        try:
            with tempfile.TemporaryDirectory() as tmp:
                archive = cifar.synthetic_archive(Path(tmp) / ARCHIVE_NAME, args.synthetic_train,
                                                  args.synthetic_test, args.synthetic_seed, args.spec)
                ds = cifar.read_archive(archive, allow_custom=True)
        except OSError as e:
            raise DataError(f"cannot write the synthetic archive under {tempfile.gettempdir()}: {e.strerror}; "
                            "free space there or point TMPDIR elsewhere") from None
        ds.source = "synthetic"
        return ds
    if request["source"] == "download":
        archive = cifar.download(args.download_dir or args.out / "downloads")
        ds = cifar.read_archive(archive, allow_custom=False)
        ds.source = "download"
        return ds
    path = Path(request["source"])
    return cifar.read_directory(path, args.allow_custom) if path.is_dir() else cifar.read_archive(path,
                                                                                                 args.allow_custom)


def up_to_date(out: Path, request: dict) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    try:
        m = verify(out)
    except DataError:
        return False
    if m.get("request") != request:
        return False
    if request["source"] in ("synthetic", "download"):  # not paths (a directory ./synthetic is not the source)
        return True
    src = Path(request["source"])
    if src.is_file():  # a local archive may have been replaced under the same name
        return m["source_checksum"] == f"md5:{digest(src, 'md5')}"
    if src.is_dir():
        return m["source_checksum"] == cifar.read_directory(src, allow_custom=True).checksum
    return True


@contextlib.contextmanager
def only_writer(out: Path):
    """Hold OUT/.prep.lock (flock) while this process prepares OUT: a second data prep into the same directory is
    refused instead of removing the first one's temporary files. A directory this creates is removed again when
    the block fails."""
    created = missing_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK, "a")  # noqa: SIM115  (held open: the flock lives with it)

    def remove_created():
        if created:
            (out / LOCK).unlink(missing_ok=True)
            remove_empty(created)
    try:
        try:
            locked = try_lock(lock, out / LOCK)
        except OSError as e:
            remove_created()
            raise DataError(f"{e.strerror}; choose an --out on one that does") from None
        if not locked:  # OUT and its lock are the holder's, even when this process saw OUT missing a moment ago
            raise DataError(f"another data prep is writing {out}; wait for it to end or choose another --out")
        try:
            yield
        except BaseException:
            remove_created()
            raise
    finally:
        lock.close()


def main(argv=None) -> int:
    # SIGTERM unwinds like Ctrl-C so that temporary files are removed; nothing half-written keeps a final name.
    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)
        check(args)
        request = request_of(args)
        with only_writer(args.out):
            for stale in args.out.glob(".cifar100_*.tmp*"):  # of a prep that was killed: no other one is running
                stale.unlink()
            if not args.force and up_to_date(args.out, request):
                print(f"{args.out}/{MANIFEST} is up to date with --source {args.source}: nothing to do (--force "
                      "redoes)")
                return 0
            t0 = time.time()
            ds = load(args, request)
            print(f"read {len(ds.train.images)} train / {len(ds.test.images)} test images from {ds.source} "
                  f"({ds.checksum}{', official' if ds.official else ', custom'})")
            m = write_dataset(ds, args.out, request, workers=args.workers)
    except JobError as e:
        return report(e)
    except MemoryError:
        print("error: not enough memory to hold the data set (a CIFAR-100 image takes about 3 KB, twice while its "
              "beton is checked); ask for fewer images or use a machine with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how = f"stopped by {e.args[0]}" if e.args else "interrupted"
        print(f"error: {how}; the data set that was there (if any) is unchanged and nothing half-written was kept; "
              "rerun to prepare the data", file=sys.stderr)
        return 143 if e.args else 130
    print(f"wrote {args.out}/{MANIFEST}: train {m['splits']['train']['count']}, test {m['splits']['test']['count']} "
          f"images, verified by read-back, in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    exit_now(main())

"""python -m data_prep: CIFAR-100 (download, local archive/directory, or synthetic) → data/*.beton + manifest.json"""
import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import cifar
from .beton import write_dataset
from .cifar import ARCHIVE_NAME, DataError
from .manifest import MANIFEST, verify


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default="download",
                   help=f"'download' (official archive, MD5-checked), 'synthetic', or a path to {ARCHIVE_NAME} "
                        "or its extracted directory")
    p.add_argument("--out", type=Path, default=Path("data"), help="output directory for the betons and manifest")
    p.add_argument("--allow-custom", action="store_true",
                   help="accept a local archive/directory that is not the official one (e.g. a subset)")
    p.add_argument("--force", action="store_true", help="rewrite even when the manifest says it is up to date")
    p.add_argument("--download-dir", type=Path, default=None, help="where the archive is downloaded [OUT/downloads]")
    p.add_argument("--synthetic-train", type=int, default=5000, help="synthetic: number of training images")
    p.add_argument("--synthetic-test", type=int, default=1000, help="synthetic: number of test images")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--synthetic-noise", type=float, default=48.0, help="synthetic: pixel noise std (0..255 scale)")
    p.add_argument("--workers", type=int, default=2, help="FFCV writer processes")
    return p.parse_args(argv)


def request_of(args) -> dict:
    if args.source == "synthetic":
        if args.synthetic_train < 1 or args.synthetic_test < 1:
            raise DataError("--synthetic-train and --synthetic-test must be at least 1")
        return {"source": "synthetic", "train": args.synthetic_train, "test": args.synthetic_test,
                "seed": args.synthetic_seed, "noise": args.synthetic_noise}
    if args.source == "download":
        return {"source": "download"}
    path = Path(args.source)
    if not path.exists():
        raise DataError(f"--source {args.source}: no such file or directory; use 'download', 'synthetic', "
                        f"or a path to {ARCHIVE_NAME} or its extracted directory")
    return {"source": str(path.resolve()), "allow_custom": args.allow_custom}


def load(args, request: dict) -> cifar.Cifar100:
    if request["source"] == "synthetic":
        with tempfile.TemporaryDirectory() as tmp:
            archive = cifar.synthetic_archive(Path(tmp) / ARCHIVE_NAME, args.synthetic_train, args.synthetic_test,
                                              args.synthetic_seed, args.synthetic_noise)
            ds = cifar.read_archive(archive, allow_custom=True)
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
    src = Path(request["source"])
    if src.is_file():  # a local archive may have been replaced under the same name
        return m["source_checksum"] == f"md5:{cifar.md5sum(src)}"
    if src.is_dir():
        return m["source_checksum"] == cifar.read_directory(src, allow_custom=True).checksum
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C so that temporary files are removed; nothing half-written keeps a final name.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        request = request_of(args)
        for stale in args.out.glob(".cifar100_*.tmp*"):
            stale.unlink()
        if not args.force and up_to_date(args.out, request):
            print(f"{args.out}/{MANIFEST} is up to date with --source {args.source}: nothing to do (--force redoes)")
            return 0
        t0 = time.time()
        ds = load(args, request)
        print(f"read {len(ds.train.images)} train / {len(ds.test.images)} test images from {ds.source} "
              f"({ds.checksum}{', official' if ds.official else ', custom'})")
        m = write_dataset(ds, args.out, request, workers=args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/{MANIFEST}: train {m['splits']['train']['count']}, test {m['splits']['test']['count']} "
          f"images, verified by read-back, in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

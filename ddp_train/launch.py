"""`make train`: pick the hardware recipe, prepare data if missing, then start the trainer on every local GPU.

With GPUs: one process per GPU under torchrun (python -m ddp_train.torchrun: torchrun with one-line endings), the
default recipe, the official CIFAR-100 in data/ (SOURCE=synthetic: the full-size hard synthetic set). One GPU needs
no torchrun: the trainer runs as the one process itself, which saves torchrun's start-up and handles the same
signals. Without a GPU: the `cpu-demo` preset on 2 gloo processes and a 5,000-image synthetic set (medium
difficulty) in data/synthetic-demo/, apart from the full-size one in data/synthetic/.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, OneLineParser, load_file


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a number of processes, 1 or more, got '{text}'")
    return int(text)


def gpus() -> list:
    """The names of the GPUs this process may use, from nvidia-smi (importing torch to ask would add seconds to
    every launch) and CUDA_VISIBLE_DEVICES."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = names[:len([v for v in visible.split(",") if v.strip()])]
    return names


def trainer_flag(args: list, flag: str):
    """The value of the last `flag` among the trainer's arguments ('' when it has none), None when absent."""
    values = [a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
              for i, a in enumerate(args) if a == flag or a.startswith(flag + "=")]
    return values[-1] if values else None


def held(data_dir: str) -> str:
    """What a prepared data directory holds, from its manifest: the launch line says which data trains."""
    try:
        m = json.loads((Path(data_dir) / "manifest.json").read_text())
        counts = f"{m['splits']['train']['count']:,} train / {m['splits']['test']['count']:,} test images"
        level = (m.get("request") or {}).get("difficulty")
        what = m["source"] + (f", difficulty {level:g}" if m["source"] == "synthetic" and level is not None else "")
        return f"{counts} ({what})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a manifest this launcher cannot read (the trainer checks it)"


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m ddp_train.launch", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="", help="data source for data_prep (default: download with GPUs, "
                                                "synthetic without)")
    p.add_argument("--data-dir", default="", help="default: data/ (synthetic data: data/synthetic/ with GPUs, "
                                                  "data/synthetic-demo/ without)")
    p.add_argument("--nproc", type=positive, default=0, help="processes (default: one per GPU, or 2 on CPU)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="passed to python -m ddp_train")
    args = p.parse_args(argv)
    extra = [a for a in args.trainer_args if a != "--"]
    given = trainer_flag(extra, "--data-dir")
    if given == "":
        p.error("the trainer's --data-dir needs a directory")
    if given is None and (path := trainer_flag(extra, "--config")):  # a config file may name it
        try:
            given = load_file(Path(path)).get("data_dir")
        except ConfigError:
            pass  # the trainer says what is wrong with the file
    if given and args.data_dir and Path(given).resolve() != Path(args.data_dir).resolve():
        p.error(f"the data directory is given twice ({args.data_dir} and the trainer's --data-dir {given}); "
                "give it once")

    names = gpus()
    source = args.source or ("download" if names else "synthetic")
    default = "data" if source != "synthetic" else "data/synthetic" if names else "data/synthetic-demo"
    data_dir = given or args.data_dir or default
    nproc = args.nproc or len(names) or 2
    if names:
        size = []  # data_prep's synthetic set: CIFAR-100's size, the default (hard) difficulty
        print(f"launch: {len(names)} GPU(s) ({names[0]}): {nproc} process(es), the full recipe (python -m "
              f"ddp_train --help shows it)")
    else:
        # a tenth of the size, and medium difficulty: the hard set teaches a CPU demo little in 4 epochs
        size = ["--synthetic-train", "5000", "--synthetic-test", "1000", "--synthetic-difficulty", "medium"]
        extra = ["--preset", "cpu-demo", *extra]
        print(f"launch: no GPU found — CPU demo: {nproc} gloo process{'es' * (nproc > 1)}, preset cpu-demo "
              "(ResNet-18 at width 16, 4 epochs). On GPUs the same command trains the full recipe.")

    if (Path(data_dir) / "manifest.json").is_file():  # data prepared earlier is used as it is
        print(f"launch: data in {data_dir}/: {held(data_dir)}")
    else:
        from data_prep.__main__ import main as prep
        print(f"launch: no prepared data in {data_dir}/: preparing it (--source {source})", flush=True)
        if prep(["--source", source, "--out", data_dir, *(size if source == "synthetic" else [])]) != 0:
            return 1

    trainer = ["-m", "ddp_train", *(["--data-dir", data_dir] if not given else []), *extra]  # (a given one is in extra)
    if nproc == 1:
        cmd = [sys.executable, *trainer]
    else:  # torchrun, ending in one line instead of a traceback when a worker fails or a signal stops it
        cmd = [sys.executable, "-m", "ddp_train.torchrun", "--standalone", f"--nproc_per_node={nproc}",
               "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2", *trainer]
    print("launch: " + " ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())

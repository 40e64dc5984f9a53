"""`make train`: pick the hardware recipe, prepare data if missing, then exec torchrun on every local GPU
(python -m ddp_train.torchrun: torchrun with one-line endings).

With GPUs: one process per GPU, the default (real) recipe, the official CIFAR-100 in data/.
Without: the `cpu-demo` preset on 2 gloo processes and a 5,000-image synthetic set in data/synthetic/; its 4 epochs
take ~30 s on the 2-vCPU build machine (measured).
"""
import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_train.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="", help="data source for data_prep (default: download with GPUs, "
                                                "synthetic without)")
    p.add_argument("--data-dir", default="", help="default: data/ (data/synthetic/ for synthetic data)")
    p.add_argument("--nproc", default="", help="processes (default: one per GPU, or 2 on CPU)")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="passed to python -m ddp_train")
    args = p.parse_args(argv)

    import torch
    gpus = torch.cuda.device_count()
    source = args.source or ("download" if gpus else "synthetic")
    data_dir = args.data_dir or ("data/synthetic" if source == "synthetic" else "data")
    nproc = int(args.nproc) if args.nproc else (gpus or 2)
    extra = [a for a in args.trainer_args if a != "--"]
    if gpus:
        print(f"launch: {gpus} GPU(s) ({torch.cuda.get_device_name(0)}): {nproc} processes, the full recipe "
              f"(python -m ddp_train --help shows it), data from {data_dir}")
    else:
        extra = ["--preset", "cpu-demo", *extra]
        print(f"launch: no GPU found — CPU demo: {nproc} gloo processes, preset cpu-demo (ResNet-18 at width 16, "
              f"4 epochs), {source} data in {data_dir}/. On GPUs the same command trains the full recipe.")

    if not (Path(data_dir) / "manifest.json").is_file():
        from data_prep.__main__ import main as prep
        print(f"launch: no prepared data in {data_dir}/: preparing it (--source {source})", flush=True)
        if prep(["--source", source, "--out", data_dir]) != 0:
            return 1

    # torchrun, ending in one line instead of a traceback when a worker fails or a signal stops it
    cmd = [sys.executable, "-m", "ddp_train.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2", "-m", "ddp_train", "--data-dir", data_dir,
           *extra]
    print("launch: " + " ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())

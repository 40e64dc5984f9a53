"""Throughput with per-step MLflow logging (every 10 steps, asynchronous) against none, in one session.

    python benchmarks/logging_overhead.py [--data-dir data/synthetic-demo] [--repeats 5] [-- trainer flags]

Runs the trainer alternately with and without `--log-every-steps`, each into a fresh sqlite store, and reports
the median training images/s of each (epochs after the first, which includes compilation and warm-up) and their
ratio. Interleaving the two spreads machine noise over both; the median discards outliers.
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RATE = re.compile(r"^epoch (\d+) \|.*\| ([\d.]+) img/s", re.M)


def one_run(data_dir: str, log_every: int, extra: list) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ddp_train", "--data-dir", data_dir, "--tracking-uri",
               f"sqlite:///{tmp}/mlflow.db", "--out-dir", tmp, "--no-system-metrics",
               "--log-every-steps", str(log_every), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [float(rate) for epoch, rate in RATE.findall(out) if int(epoch) > 0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/synthetic-demo")  # make train's CPU demo set
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: trainer flags")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"] or ["--preset", "cpu-demo", "--width", "8", "--epochs", "3"]
    if not (Path(args.data_dir) / "manifest.json").is_file():
        print(f"error: no prepared data in {args.data_dir}/; run make train once (it prepares the CPU demo set) or "
              "pass --data-dir", file=sys.stderr)
        return 1
    rates = {0: [], args.every: []}
    for r in range(args.repeats):
        for every in (0, args.every) if r % 2 == 0 else (args.every, 0):
            rates[every] += one_run(args.data_dir, every, extra)
    base, logged = statistics.median(rates[0]), statistics.median(rates[args.every])
    print(f"no step logging:          median {base:.0f} img/s over {len(rates[0])} epochs")
    print(f"log every {args.every} steps (async): median {logged:.0f} img/s over {len(rates[args.every])} epochs")
    print(f"ratio {logged / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

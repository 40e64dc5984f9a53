"""Peers in one run (issue 8, item 5): the trainer with each loader, the PyTorch loop most users write, and the
trainer's step alone — on one device, the same model, batch, precision and memory format.

    python benchmarks/peers.py --data-dir DIR [--epochs 40] [--plain-epochs 5] [--workers 12] [--out DIR]
    python benchmarks/peers.py --smoke --out DIR [--data-dir DIR]     # CPU smoke run: tiny, numbers meaningless
    python benchmarks/peers.py --from-json DIR/peers.json --write-docs   # a GPU run's table → docs/performance.md

Each part runs in its own process, one after the other:
- trainer, `python -m ddp_train --loader resident|ffcv --no-mlflow` for --epochs epochs: images/s as it prints
  them (median over the epochs after the first), the process's whole wall time (start-up included) and its time
  budget (runs/<name>/time_budget.csv);
- plain: what most users write — a map-style dataset doing what torchvision.datasets.CIFAR100 does per item (PIL
  image, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) over the betons' images (read once),
  a DataLoader with --workers worker processes, pin_memory, persistent workers, copies with non_blocking=True —
  feeding the trainer's own step (ddp_train.step.train_step), model, optimizer, schedule, precision and memory
  format;
- step: gpu_step.py's timing of the trainer's step on uint8 batches already on the device (no loader).
Results go to OUT/peers.json (rewritten after each part) and OUT/peers.md; --write-docs puts the table between the
`<!-- peers:begin -->` and `<!-- peers:end -->` markers of docs/performance.md, never for a CPU or smoke run.
"""
import argparse
import csv
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from ddp_train.errors import ConfigError, JobError, report  # noqa: E402

PARTS = ("resident", "step", "plain", "ffcv")  # the default trainer (auto → resident on a GPU) first
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
EPOCH_LINE = re.compile(r"^epoch (\d+) \|.*\| (\d+) img/s \| ([\d.]+) s$")
RUN_LINE = re.compile(r"^run \S+: .*, amp (\w+), (\w+) loader, ")
SMOKE = {"epochs": 2, "plain_epochs": 2, "workers": 1, "width": 8, "batch_size": 32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="prepared betons (python -m data_prep); --smoke prepares a small set if absent")
    p.add_argument("--out", help="results, logs and the trainer's runs (default: runs/peers-<time>)")
    p.add_argument("--epochs", type=int, help="trainer epochs (default 40; smoke 2)")
    p.add_argument("--plain-epochs", type=int, help="plain-loop epochs (default 5; smoke 2)")
    p.add_argument("--workers", type=int, help="FFCV threads and DataLoader processes (default 12; smoke 1)")
    p.add_argument("--width", type=int, help="ResNet-18 width (default 64; smoke 8)")
    p.add_argument("--batch-size", type=int, help="batch (default 512; smoke 32)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--part-timeout", type=float, default=600, help="seconds before a part is stopped")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: proves the script works, measures nothing")
    p.add_argument("--plan", action="store_true", help="print the commands it would run and exit")
    p.add_argument("--from-json", help="render (and with --write-docs, write) the table of an earlier run")
    p.add_argument("--write-docs", action="store_true", help="put the table into --docs (GPU results only)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--part", choices=["plain", "step"], help=argparse.SUPPRESS)  # one part, in a child process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else {"epochs": 40, "plain_epochs": 5, "workers": 12, "width": 64,
                                        "batch_size": 512}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if bad := [s for s in args.parts if s not in PARTS]:
        raise ConfigError(f"--parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    for k in ("epochs", "plain_epochs", "workers", "width", "batch_size"):
        if getattr(args, k) <= 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if min(args.epochs, args.plain_epochs) < 2:
        raise ConfigError("--epochs and --plain-epochs must be at least 2 (the first epoch is warm-up, not counted)")
    return args


def recipe(args):
    from ddp_train.config import Config
    return Config(data_dir=args.data_dir, width=args.width, batch_size=args.batch_size, epochs=args.epochs,
                  warmup_epochs=min(5.0, args.epochs / 8), num_workers=args.workers)  # the recipe's 5 of 40


def train_path(data_dir) -> Path:
    from data_prep import manifest
    return Path(data_dir) / manifest.beton_name("train")


def num_classes(data_dir) -> int:
    from data_prep import manifest
    return len(manifest.read_manifest(Path(data_dir))["fine_label_names"])


# -- the parts that run in a child process ------------------------------------------------------------------------

def device_info(threads: int):
    import torch
    torch.set_num_threads(threads)  # the trainer's loaders set torch's threads to their worker count: the same here
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:  # as the trainer does
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}


class PlainCifar:
    """A map-style dataset doing what torchvision.datasets.CIFAR100.__getitem__ does: a PIL image, then the
    transform, per item."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_part(args) -> dict:
    import torch
    import torch.nn as nn
    import torchvision.transforms as T
    from torch.utils.data import DataLoader

    from ddp_train import data, resident, step
    from ddp_train.models import build_model
    cfg = recipe(args)
    device, info = device_info(args.workers)
    torch.manual_seed(cfg.seed)
    train = resident.ResidentTrain(train_path(cfg.data_dir), cfg.batch_size, cfg.seed, "cpu")  # the beton, read once
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.MEAN, data.STD)])
    cuda = device.type == "cuda"
    loader = DataLoader(PlainCifar(train.images.numpy(), train.fine.numpy(), transform), batch_size=cfg.batch_size,
                        shuffle=True, num_workers=args.workers, pin_memory=cuda, drop_last=True,
                        persistent_workers=True)
    mem = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model, num_classes(cfg.data_dir), cfg.width, cfg.norm).to(device, memory_format=mem)
    opt = step.make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, step.lr_lambda(cfg, len(loader)))
    amp_dtype, use_scaler = step.resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    rates, top1 = [], []
    for epoch in range(args.plain_epochs):
        t = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        seen = 0
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=mem)
            y = y.to(device, non_blocking=True)
            loss, logits = step.train_step(model, x, y, opt, scaler, crit, amp_dtype, device)
            sched.step()
            sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double()])
            seen += len(y)
        _, correct = sums.tolist()  # waits for the GPU: the epoch's time is complete
        rates.append(seen / (time.perf_counter() - t))
        top1.append(100 * correct / seen)
        print(f"plain epoch {epoch} | train {top1[-1]:.2f} % | {rates[-1]:.0f} img/s", flush=True)
    return {**info, "images_per_s": statistics.median(rates[1:]), "images_per_s_epochs": rates, "train_top1": top1,
            "loader": f"DataLoader, {args.workers} workers, pin_memory={cuda}, persistent_workers, non_blocking"}


def step_part(args) -> dict:
    import torch
    sys.path.insert(0, str(BENCH))
    import gpu_step
    cfg = recipe(args)
    device, info = device_info(args.workers)
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    batches = [(torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 100, (cfg.batch_size,), device=device)) for _ in range(4)]
    v = gpu_step.Variant("the trainer's step", amp=cfg.amp, channels_last=cfg.channels_last)
    steps, repeats, warmup = (30, 5, 15) if cuda else (3, 2, 1)
    med, lo, hi, warm_s, _ = gpu_step.time_variant(gpu_step.step_fn(cfg, device, gen, batches, v), steps, repeats,
                                                   warmup, cuda)
    return {**info, "images_per_s": cfg.batch_size / med, "s_per_step": med, "min": lo, "max": hi,
            "warmup_s": warm_s, "windows": f"median of {repeats} windows of {steps} steps after {warmup} warm-up"}


# -- the driver ---------------------------------------------------------------------------------------------------

def trainer_cmd(args, loader: str, runs: Path, name: str) -> list:
    return [sys.executable, "-m", "ddp_train", "--data-dir", args.data_dir, "--loader", loader, "--no-mlflow",
            "--epochs", str(args.epochs), "--warmup-epochs", f"{recipe(args).warmup_epochs:g}",  # the plain loop's
            "--width", str(args.width), "--batch-size", str(args.batch_size), "--num-workers", str(args.workers),
            "--out-dir", str(runs), "--run-name", name, "--progress", "line", "--resume", "never"]


def child_cmd(args, part: str, result: Path) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result),
            "--data-dir", args.data_dir, "--plain-epochs", str(args.plain_epochs), "--workers", str(args.workers),
            "--width", str(args.width), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]


def run_logged(cmd: list, log: Path, timeout: float) -> tuple:
    """Run `cmd` from the repository root, its output into `log` and echoed. → (exit status, wall s, output)."""
    t = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    lines = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def copy():
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                print(f"  {line}", end="", flush=True)
        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
        reader.join(timeout=10)
    return code, time.perf_counter() - t, "".join(lines)


def trainer_result(args, loader: str, out: Path, stamp: str) -> dict:
    runs, name = out / "runs", f"peers-{loader}-{stamp}"
    code, wall, output = run_logged(trainer_cmd(args, loader, runs, name), out / f"trainer_{loader}.log",
                                    args.part_timeout)
    r = {"cmd": " ".join(trainer_cmd(args, loader, runs, name)), "exit": code, "wall_s": wall,
         "log": f"trainer_{loader}.log"}
    epochs = [m for m in map(EPOCH_LINE.match, output.splitlines()) if m]
    run_lines = [m for m in map(RUN_LINE.match, output.splitlines()) if m]
    kinds = [m.group(2) for m in run_lines]
    budget = runs / name / "time_budget.csv"
    if code != 0 or len(epochs) != args.epochs or kinds != [loader] or not budget.is_file():
        tail = " / ".join(output.strip().splitlines()[-3:])
        return {**r, "error": f"exit {code}, {len(epochs)} of {args.epochs} epoch lines, loader {kinds}: {tail}"}
    rates = [float(m.group(2)) for m in epochs]
    with open(budget) as f:
        phases = {row["phase"]: float(row["seconds"]) for row in csv.DictReader(f)}
    return {**r, "amp": run_lines[0].group(1), "images_per_s": statistics.median(rates[1:]),
            "images_per_s_epochs": rates, "epoch_s": [float(m.group(3)) for m in epochs], "budget": phases,
            "budget_total_s": sum(phases.values())}


def child_result(args, part: str, out: Path) -> dict:
    result = out / f"{part}.json"
    result.unlink(missing_ok=True)
    code, wall, output = run_logged(child_cmd(args, part, result), out / f"{part}.log", args.part_timeout)
    if code != 0 or not result.is_file():
        return {"exit": code, "wall_s": wall, "error": " / ".join(output.strip().splitlines()[-3:])}
    return {**json.loads(result.read_text()), "exit": code, "wall_s": wall, "log": f"{part}.log"}


def prepare_smoke_data(out: Path) -> str:
    data_dir = out / "data"
    cmd = [sys.executable, "-m", "data_prep", "--source", "synthetic", "--out", str(data_dir), "--synthetic-train",
           "256", "--synthetic-test", "128"]
    code, _, output = run_logged(cmd, out / "data_prep.log", 300)
    if code != 0:
        raise JobError(f"preparing the smoke data failed ({output.strip().splitlines()[-1:]}); see {out}/data_prep.log")
    return str(data_dir)


def ratios(res: dict) -> dict:
    base = {k: res.get(k, {}).get("images_per_s") for k in ("plain", "step")}
    out = {}
    for loader in ("resident", "ffcv"):
        rate = res.get("trainer", {}).get(loader, {}).get("images_per_s")
        for k, b in base.items():
            if rate and b:
                out[f"{loader}/{k}"] = rate / b
    return out


def fmt_rate(part: dict) -> str:
    return f"{part['images_per_s']:,.0f}" if "images_per_s" in part else "failed" if part else "not run"


def markdown(res: dict) -> str:
    """The table for docs/performance.md, between the markers."""
    rc, t, p, s = res["recipe"], res.get("trainer", {}), res.get("plain", {}), res.get("step", {})
    rt = res.get("ratios", {})
    amp = next((r["amp"] for r in t.values() if "amp" in r), "?")  # what the trainer resolved it to
    head = (f"Measured by `benchmarks/peers.py` on {res['date']}: **{res['device']}**, torch {res['torch']}; data "
            f"`{res['data']['source']}` ({res['data']['train_images']:,} training images); ResNet-18 width "
            f"{rc['width']}, batch {rc['batch_size']}, `--amp {rc['amp']}` ({amp}), channels_last "
            f"{rc['channels_last']}; "
            f"the trainer for {rc['epochs']} epochs with `--no-mlflow --num-workers {rc['workers']}`, the plain loop "
            f"for {rc['plain_epochs']}. images/s: training images over training seconds, median over the epochs "
            "after the first (evaluation not included).")
    if res["smoke"]:
        head = ("**CPU smoke run: these numbers are meaningless** (tiny model and data; it shows that the script "
                "runs). " + head)

    def x(key):
        return f"{rt[key]:.2f}×" if key in rt else "–"
    rows = ["| run | images/s | ÷ plain loop | ÷ step alone | process wall |", "|---|---|---|---|---|"]
    for loader in ("resident", "ffcv"):
        r = t.get(loader, {})
        wall = f"{r['wall_s']:.1f} s for {rc['epochs']} epochs" if "images_per_s" in r else "–"
        rows.append(f"| trainer `--loader {loader}` | {fmt_rate(r)} | {x(f'{loader}/plain')} | "
                    f"{x(f'{loader}/step')} | {wall} |")
    rows.append(f"| plain loop ({p.get('loader', 'DataLoader')}; PIL RandomCrop(32, padding=4) + flip + Normalize "
                f"per image) | {fmt_rate(p)} | 1.00× | – | – |")
    rows.append(f"| step alone (gpu_step.py's timing; uint8 batches already on the device) | {fmt_rate(s)} | – | "
                "1.00× | – |")
    budget = ["", f"Time budget of the trainer runs, seconds (each run's `time_budget.csv`; {rc['epochs']} epochs):",
              "", "| phase | `--loader resident` | `--loader ffcv` |", "|---|---|---|"]
    from ddp_train.budget import LABELS
    for phase, label in LABELS.items():
        cells = [f"{t[k]['budget'][phase]:.2f}" if "budget" in t.get(k, {}) and phase in t[k]["budget"] else "–"
                 for k in ("resident", "ffcv")]
        budget.append(f"| {label} | {' | '.join(cells)} |")
    cells = [f"**{t[k]['budget_total_s']:.1f}** (process wall measured outside: {t[k]['wall_s']:.1f})"
             if "budget" in t.get(k, {}) else "–" for k in ("resident", "ffcv")]
    budget.append(f"| total | {' | '.join(cells)} |")
    head = textwrap.fill(head, 116, break_on_hyphens=False, break_long_words=False)
    return "\n".join([head, "", *rows, *budget])


def write_docs(res: dict, docs: Path) -> None:
    if res["smoke"] or res["device"] == "cpu":
        raise ConfigError(f"--write-docs takes GPU results only; these are from a {res['device']} "
                          f"{'smoke ' if res['smoke'] else ''}run (their table is in peers.md beside the JSON)")
    failed = [k for k in ("plain", "step") if "images_per_s" not in res.get(k, {})] + \
             [k for k in ("resident", "ffcv") if "images_per_s" not in res.get("trainer", {}).get(k, {})]
    if failed:
        raise ConfigError(f"--write-docs needs every part measured; missing: {', '.join(failed)} (rerun them with "
                          "--parts)")
    text = docs.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ConfigError(f"{docs}: needs one '{BEGIN}' line before one '{END}' line")
    head, rest = text.split(BEGIN)
    tmp = docs.with_name(docs.name + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{markdown(res)}\n{END}{rest.split(END, 1)[1]}")
    os.replace(tmp, docs)


def save(res: dict, out: Path) -> None:
    res["ratios"] = ratios(res)
    tmp = out / "peers.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out / "peers.json")
    (out / "peers.md").write_text(markdown(res) + "\n")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.part:  # a child: one part, its result as JSON
            r = plain_part(args) if args.part == "plain" else step_part(args)
            Path(args.result).write_text(json.dumps(r, indent=1))
            return 0
        if args.from_json:
            res = json.loads(Path(args.from_json).read_text())
            print(markdown(res))
            if args.write_docs:
                write_docs(res, Path(args.docs))
                print(f"wrote the table into {args.docs}")
            return 0
        return drive(args)
    except JobError as e:
        return report(e)


def drive(args) -> int:
    if args.write_docs:
        raise ConfigError("--write-docs writes a finished run's table: run the benchmark, then "
                          "--from-json OUT/peers.json --write-docs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "runs" / f"peers-{stamp}").resolve()
    if args.plan:
        args.data_dir = args.data_dir or str(out / "data")
        for part in args.parts:
            cmd = trainer_cmd(args, part, out / "runs", f"peers-{part}-{stamp}") if part in ("resident", "ffcv") \
                else child_cmd(args, part, out / f"{part}.json")
            print(" ".join(cmd))
        return 0
    import torch  # only to ask whether there is a GPU: no CUDA context in this process
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise ConfigError("no CUDA device: the peers benchmark measures a GPU; on a CPU run it with --smoke")
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        if not args.smoke:
            raise ConfigError("--data-dir is required (prepare it with python -m data_prep)")
        args.data_dir = prepare_smoke_data(out)
    from data_prep import manifest as manifest_lib
    man = manifest_lib.verify(Path(args.data_dir))
    if args.smoke:
        print("SMOKE RUN: tiny model and data; the numbers below are meaningless", flush=True)
    cfg = recipe(args)
    res = {"device": "", "torch": torch.__version__, "date": datetime.date.today().isoformat(), "smoke": args.smoke,
           "data": {"dir": args.data_dir, "source": man["source"], "train_images": man["splits"]["train"]["count"]},
           "recipe": {"model": cfg.model, "width": cfg.width, "batch_size": cfg.batch_size, "amp": cfg.amp,
                      "channels_last": cfg.channels_last, "epochs": args.epochs, "plain_epochs": args.plain_epochs,
                      "workers": args.workers},
           "trainer": {}}
    for part in args.parts:
        print(f"=== {part}", flush=True)
        if part in ("resident", "ffcv"):
            res["trainer"][part] = trainer_result(args, part, out, stamp)
        else:
            res[part] = child_result(args, part, out)
            res["device"] = res[part].get("device") or res["device"]
            res["torch"] = res[part].get("torch") or res["torch"]
        save(res, out)
    if not res["device"]:  # only trainer parts ran; they are done, so a CUDA context here costs them nothing
        res["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
        save(res, out)
    print(markdown(res), flush=True)
    failed = [k for k in ("plain", "step") if "error" in res.get(k, {})] + \
             [f"trainer {k}" for k, v in res["trainer"].items() if "error" in v]
    print(f"results: {out}/peers.json, {out}/peers.md", flush=True)
    if failed:
        raise JobError(f"peers: {', '.join(failed)} failed; see the logs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

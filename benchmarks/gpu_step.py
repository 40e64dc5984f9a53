"""Training-step throughput and MFU of the trainer's own step on one GPU, per precision, memory format and compile.

    python benchmarks/gpu_step.py [--model resnet18] [--batch 512] [--steps 30] [--repeats 5] [--json out.json]

Times what the trainer runs per step — `step.prepare_batch` (normalise, augment) → `step.train_step` (forward,
loss, backward, SGD step) — on uint8 batches already on the GPU: the model's ceiling, without the loader. For each
variant: warm-up (compilation included, and reported), then `--repeats` windows of `--steps` steps timed with CUDA
events; the median window is reported. FLOPs per step are counted once with torch.utils.flop_counter (convolutions
and matmuls, forward and backward). MFU is the achieved rate over the dense bf16 rate this script measures on the
same card with an 8192³ matmul, so it is honest for the card as found; fp32 (TF32) variants are shown against the
same peak. One variant wraps the model in DDP over a one-rank NCCL group, to show what the wrapper costs alone.
On a machine without CUDA it runs a tiny smoke version on the CPU (numbers meaningless).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp_train.config import Config  # noqa: E402
from ddp_train.models import build_model  # noqa: E402
from ddp_train.step import make_optimizer, prepare_batch, resolve_amp, train_step, wrap_model  # noqa: E402

VARIANTS = [  # name, --amp, channels_last, compile, DDP over a one-rank NCCL group
    ("fp32/tf32 NCHW", "off", False, False, False),
    ("bf16 NCHW", "bf16", False, False, False),
    ("bf16 channels_last (default)", "bf16", True, False, False),
    ("fp16+scaler channels_last", "fp16", True, False, False),
    ("bf16 channels_last DDP(nccl,1)", "bf16", True, False, True),
    ("bf16 channels_last compile", "bf16", True, True, False),
]


def matmul_peak(device, n=8192, reps=20) -> float:
    """Dense bf16 FLOP/s of this card, on random data (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def setup(cfg: Config, device, amp: str, channels_last: bool, compile_: bool, ddp: bool):
    torch.manual_seed(0)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg.model, 100, cfg.width, cfg.norm).to(device, memory_format=mem)
    net = wrap_model(model, dataclasses.replace(cfg, compile=compile_), device, distributed=ddp)
    amp_dtype, use_scaler = resolve_amp(amp, device)
    return (net, make_optimizer(cfg, model), torch.amp.GradScaler(device.type, enabled=use_scaler),
            nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), amp_dtype, mem)


def step_fn(cfg, device, gen, batches, amp, channels_last, compile_, ddp):
    net, opt, scaler, crit, amp_dtype, mem = setup(cfg, device, amp, channels_last, compile_, ddp)
    net.train()

    def step(i):
        images, labels = batches[i % len(batches)]
        return train_step(net, prepare_batch(images, cfg, gen, mem), labels, opt, scaler, crit, amp_dtype, device)
    return step


def flops_per_step(cfg, device, gen, batches) -> float:
    step = step_fn(cfg, device, gen, batches, "off", True, False, False)
    with FlopCounterMode(display=False) as counter:
        step(0)
    return float(counter.get_total_flops())


def time_variant(step, steps, repeats, warmup, cuda) -> tuple:
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    windows = []
    for r in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t = time.perf_counter()
        for i in range(steps):
            step(i)
        if cuda:
            end.record()
            end.synchronize()
            windows.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            windows.append((time.perf_counter() - t) / steps)
    return statistics.median(windows), min(windows), max(windows), warm_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["resnet18", "seed2018"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=512, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per variant (median reported)")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:  # smoke run: proves the script works, not a measurement
        args.batch, args.steps, args.repeats, args.warmup, args.width = 8, 2, 2, 1, 8
    torch.backends.cudnn.benchmark = True  # as the trainer does on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = Config(model=args.model, width=args.width)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    batches = [(torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 100, (args.batch,), device=device)) for _ in range(4)]

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = matmul_peak(device) if cuda else float("nan")
    flops = flops_per_step(cfg, device, gen, batches)
    print(f"device {name}; torch {torch.__version__}; model {args.model} width {args.width}; batch {args.batch}; "
          f"{flops / 1e9:.1f} GFLOP per step ({flops / args.batch / 1e9:.3f} per image, fwd+bwd); "
          f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)

    variants = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only.split(","))]
    if any(v[4] for v in variants) and cuda:
        torch_dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29577", rank=0, world_size=1,
                                      device_id=device)
    results = []
    for vname, amp, cl, comp, ddp in variants:
        if ddp and not cuda:
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step = step_fn(cfg, device, gen, batches, amp, cl, comp, ddp)
        med, lo, hi, warm_s = time_variant(step, args.steps, args.repeats, args.warmup, cuda)
        r = {"variant": vname, "s_per_step": med, "min": lo, "max": hi, "images_per_s": args.batch / med,
             "tflops": flops / med / 1e12, "mfu": flops / med / peak, "warmup_s": warm_s,
             "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else 0.0}
        results.append(r)
        print(f"  {vname:32s} {r['images_per_s']:9.0f} img/s  {med * 1e3:7.2f} ms/step "
              f"(min {lo * 1e3:.2f}, max {hi * 1e3:.2f})  {r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f} %  "
              f"warm-up {warm_s:5.1f} s  {r['peak_mem_gib']:.1f} GiB", flush=True)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "model": args.model, "width": args.width,
                       "batch": args.batch, "flops_per_step": flops, "bf16_peak_flops": peak,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

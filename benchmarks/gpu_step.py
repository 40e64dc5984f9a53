"""Training-step throughput and MFU of the trainer's own step on one GPU, per precision, memory format, compile mode,
optimizer implementation, CUDA graph and DDP option.

    python benchmarks/gpu_step.py [--model resnet18] [--batch 512[,256,…]] [--only a,b] [--skip c] [--json out.json]
    python benchmarks/gpu_step.py --list          # the variants, and which this machine would skip

Times what the trainer runs per step — `step.prepare_batch` (normalise, augment) → `step.train_step` (forward,
loss, backward, SGD step) — on uint8 batches already on the GPU: the model's ceiling, without the loader. For each
variant: warm-up (compilation or graph capture included, and reported), then `--repeats` windows of `--steps` steps
timed with CUDA events; the median window is reported. FLOPs per step are counted once with torch.utils.flop_counter
(convolutions and matmuls, forward and backward). MFU is the achieved rate over the dense bf16 rate this script
measures on the same card with an 8192³ matmul, so it is honest for the card as found; fp32 (TF32) variants are
shown against the same peak. DDP variants wrap the model over a one-rank NCCL group, to show what the wrapper and
its options cost alone.

Variants for issue 8 (item 3: a faster step; item 6: DDP options), each with its warm-up:
- CUDA graph, captured directly with torch.cuda.CUDAGraph (no compiler): the whole step (forward, loss, backward,
  fused SGD with the learning rate in a device tensor, so a schedule can change it between replays) replayed per
  step after the batch is copied into static buffers. "from the augmented batch": normalise and augment run eagerly
  and the graph starts at their output; "with augmentation": the uint8 batch is the static input and the
  augmentation's generator is registered with the graph (register_generator_state), so every replay draws new
  random numbers — not the same numbers as the eager step draws, so a graphed run is not bit-identical to an
  eager one.
- torch.compile of the model, modes reduce-overhead (CUDA graph trees) and max-autotune-no-cudagraphs; the
  Inductor caches live in TORCHINDUCTOR_CACHE_DIR, so a second run on the same machine shows the cached warm-up.
- SGD foreach / fused (the trainer passes neither: PyTorch picks foreach on CUDA).
- cuDNN's heuristics instead of its autotuning (torch.backends.cudnn.benchmark off): the step's speed against the
  warm-up it saves.
- DDP gradient_as_bucket_view, static_graph, bucket_cap_mb=100 (the default is 25), all three, and
  broadcast_buffers=False.
A variant that fails is reported and the others still run; CUDA-only variants are listed as skipped on a CPU. On a
machine without CUDA it runs a tiny smoke version on the CPU (numbers meaningless).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp_train.config import Config
from ddp_train.models import build_model
from ddp_train.step import make_optimizer, prepare_batch, resolve_amp, train_step, wrap_model


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    amp: str = "bf16"
    channels_last: bool = True
    compile: str = ""      # torch.compile mode of the model ("" = eager)
    ddp: tuple = None      # DDP keyword arguments as (key, value) pairs, over a one-rank NCCL group; None = no DDP
    sgd: str = ""          # "foreach" or "fused"; "" = the trainer's optimizer as is
    graph: str = ""        # "step": CUDA graph from the augmented batch on; "step+aug": from the uint8 batch on
    autotune: bool = True  # torch.backends.cudnn.benchmark, as the trainer sets it on GPUs (off: cuDNN's heuristics)

    def skip_reason(self, cuda: bool) -> str:
        """Why this variant cannot run here ("" when it can)."""
        if cuda:
            return ""
        if self.graph:
            return "CUDA graphs need a CUDA device"
        if self.compile == "reduce-overhead":
            return "mode reduce-overhead captures CUDA graphs: needs a CUDA device"
        if self.compile.startswith("max-autotune"):
            return "max-autotune tunes Triton kernels: needs a CUDA device"
        if self.ddp is not None:
            return "DDP here runs over a one-rank NCCL group: needs a CUDA device"
        return ""


VARIANTS = [
    Variant("fp32/tf32 NCHW", amp="off", channels_last=False),
    Variant("bf16 NCHW", channels_last=False),
    Variant("bf16 channels_last (default)"),
    Variant("fp16+scaler channels_last", amp="fp16"),
    Variant("bf16 channels_last DDP(nccl,1)", ddp=()),
    Variant("bf16 channels_last compile", compile="default"),
    # issue 8, item 3
    Variant("bf16 cl SGD foreach", sgd="foreach"),
    Variant("bf16 cl SGD fused", sgd="fused"),
    # cuDNN autotuning is most of the trainer's first-epoch warm-up (2.4 s on one H100): what do its kernels buy?
    Variant("bf16 cl no cuDNN autotuning", autotune=False),
    Variant("bf16 cl CUDA graph from the augmented batch", sgd="fused", graph="step"),
    Variant("bf16 cl CUDA graph with augmentation", sgd="fused", graph="step+aug"),
    Variant("bf16 cl compile reduce-overhead", compile="reduce-overhead"),
    Variant("bf16 cl compile max-autotune-no-cudagraphs", compile="max-autotune-no-cudagraphs"),
    # issue 8, item 6 (the trainer uses DDP's defaults today)
    Variant("bf16 cl DDP gradient_as_bucket_view", ddp=(("gradient_as_bucket_view", True),)),
    Variant("bf16 cl DDP static_graph", ddp=(("static_graph", True),)),
    Variant("bf16 cl DDP bucket_cap_mb=100", ddp=(("bucket_cap_mb", 100),)),
    # BatchNorm buffers broadcast from rank 0 before every forward (the trainer broadcasts them before evaluation)
    Variant("bf16 cl DDP broadcast_buffers=False", ddp=(("broadcast_buffers", False),)),
    Variant("bf16 cl DDP all three", ddp=(("gradient_as_bucket_view", True), ("static_graph", True),
                                          ("bucket_cap_mb", 100))),
]


def select(only: str, skip: str) -> list:
    """Variants whose names contain one of the comma-separated `only` substrings (all if empty), minus `skip`'s."""
    def hit(v, spec):
        return any(s and s in v.name for s in spec.split(","))
    return [v for v in VARIANTS if (not only or hit(v, only)) and not (skip and hit(v, skip))]


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


def setup(cfg: Config, device, v: Variant):
    """The trainer's model, optimizer, scaler and loss for variant `v`."""
    torch.manual_seed(0)
    mem = torch.channels_last if v.channels_last else torch.contiguous_format
    model = build_model(cfg.model, 100, cfg.width, cfg.norm).to(device, memory_format=mem)
    if v.ddp is not None:
        net = DDP(model, device_ids=[device], **dict(v.ddp))
    else:
        net = wrap_model(model, dataclasses.replace(cfg, compile=v.compile == "default"), device, distributed=False)
    if v.compile not in ("", "default"):
        net = torch.compile(net, mode=v.compile)
    opt = make_optimizer(cfg, model)  # the trainer's hyperparameters; a variant changes only the implementation
    if v.sgd:
        kw = {**opt.defaults, "foreach": v.sgd == "foreach", "fused": v.sgd == "fused"}
        if v.graph:  # a device tensor: a captured step reads it on every replay (a float would be baked in)
            kw["lr"] = torch.tensor(cfg.lr, device=device)
        opt = torch.optim.SGD(model.parameters(), **kw)
    amp_dtype, use_scaler = resolve_amp(v.amp, device)
    return (net, opt, torch.amp.GradScaler(device.type, enabled=use_scaler),
            nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), amp_dtype, mem)


def step_fn(cfg, device, gen, batches, v: Variant):
    """→ step(i): one training step on batch i (mod the batches), as the trainer runs it; returns the loss."""
    net, opt, scaler, crit, amp_dtype, mem = setup(cfg, device, v)
    net.train()
    mark = torch.compiler.cudagraph_mark_step_begin if v.compile == "reduce-overhead" else (lambda: None)

    def step(i):
        images, labels = batches[i % len(batches)]
        mark()
        return train_step(net, prepare_batch(images, cfg, gen, mem), labels, opt, scaler, crit, amp_dtype,
                          device)[0]
    return step


def graph_step_fn(cfg, device, gen, batches, v: Variant, warmup: int):
    """The whole step captured once in a CUDA graph and replayed. → (step(i), capture seconds)."""
    net, opt, scaler, crit, amp_dtype, mem = setup(cfg, device, v)
    net.train()
    lr = opt.param_groups[0]["lr"]
    with_aug = v.graph == "step+aug"
    static_images, static_labels = (t.clone() for t in batches[0])
    static_x = prepare_batch(static_images, cfg, gen, mem)  # also creates normalize's cached mean/std before capture

    def run():
        x = prepare_batch(static_images, cfg, gen, mem) if with_aug else static_x
        return train_step(net, x, static_labels, opt, scaler, crit, amp_dtype, device)[0]

    side = torch.cuda.Stream(device)  # warm up on a side stream, as capture requires (cuDNN autotuning, SGD state)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(3, warmup)):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    if with_aug:
        graph.register_generator_state(gen)  # replays advance the generator instead of repeating one draw
    # thread_local: a NCCL watchdog thread (DDP variants in this process) may query events while we capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        loss = run()
    torch.cuda.synchronize(device)
    capture_s = time.perf_counter() - t

    def step(i):
        images, labels = batches[i % len(batches)]
        lr.fill_(cfg.lr)  # where a schedule would write this step's rate: a kernel, no host sync
        if with_aug:
            static_images.copy_(images)
        else:
            static_x.copy_(prepare_batch(images, cfg, gen, mem))
        static_labels.copy_(labels)
        graph.replay()
        return loss
    return step, capture_s


def flops_per_step(cfg, device, gen, batches) -> float:
    step = step_fn(cfg, device, gen, batches, Variant("count", amp="off"))
    with FlopCounterMode(display=False) as counter:
        step(0)
    return float(counter.get_total_flops())


def time_variant(step, steps, repeats, warmup, cuda) -> tuple:
    """→ (median, min, max seconds per step over the windows, warm-up seconds, the last step's loss)."""
    t0 = time.perf_counter()
    loss = None
    for i in range(warmup):
        loss = step(i)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    windows = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        if cuda:
            end.record()
            end.synchronize()
            windows.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            windows.append((time.perf_counter() - t) / steps)
    return statistics.median(windows), min(windows), max(windows), warm_s, float(loss)


def compile_cache_counters() -> dict:
    """Inductor / AOTAutograd cache hits and misses so far in this process (empty where torch has none)."""
    try:
        from torch._dynamo.utils import counters
        return {f"{group}.{k}": v for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
                if "cache" in k}
    except Exception:  # a private API: its absence must not fail the benchmark
        return {}


def run_variant(cfg, device, gen, batches, v: Variant, args, cuda) -> dict:
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if v.compile:
        torch._dynamo.reset()  # each compiled variant starts from nothing in memory (Inductor's disk caches stay)
    torch.backends.cudnn.benchmark = v.autotune
    t0 = time.perf_counter()
    capture_s = None
    if v.graph:
        step, capture_s = graph_step_fn(cfg, device, gen, batches, v, args.warmup)
        warmup = 2  # the graph is captured: its replays need no further warm-up
    else:
        step, warmup = step_fn(cfg, device, gen, batches, v), args.warmup
    setup_s = time.perf_counter() - t0
    med, lo, hi, warm_s, loss = time_variant(step, args.steps, args.repeats, warmup, cuda)
    batch = batches[0][0].shape[0]
    r = {"variant": v.name, "batch": batch, "s_per_step": med, "min": lo, "max": hi, "images_per_s": batch / med,
         # what a run pays before its first timed step: set-up (for a graph: its eager warm-up and the capture),
         # then the warm-up steps (compilation happens in the first of them)
         "warmup_s": setup_s + warm_s, "setup_s": setup_s, "capture_s": capture_s, "loss_last": loss,
         "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else 0.0}
    if v.compile:
        r["compile_cache"] = compile_cache_counters()
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=["resnet18", "seed2018"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", default="512", help="per-GPU batch; a comma-separated list times each")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per variant (median reported)")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    p.add_argument("--skip", default="", help="comma-separated substrings of variant names not to run")
    p.add_argument("--list", action="store_true", help="print the selected variants and exit")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    variants = select(args.only, args.skip)
    if args.list:
        for v in variants:
            reason = v.skip_reason(cuda)
            print(f"{v.name}{f'  (skipped here: {reason})' if reason else ''}")
        return 0 if variants else 2
    if not variants:
        print(f"error: no variant matches --only {args.only!r} --skip {args.skip!r}; see --list", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    batch_sizes = [int(b) for b in args.batch.split(",")]
    if not cuda:  # smoke run: proves the script works, not a measurement
        batch_sizes, args.steps, args.repeats, args.warmup, args.width = [8], 2, 2, 1, 8
    torch.backends.cudnn.benchmark = True  # as the trainer does on GPUs
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = Config(model=args.model, width=args.width)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def make_batches(b):
        return [(torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, device=device)
                 .contiguous(memory_format=torch.channels_last),
                 torch.randint(0, 100, (b,), device=device)) for _ in range(4)]

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = matmul_peak(device) if cuda else float("nan")
    flops = flops_per_step(cfg, device, gen, make_batches(batch_sizes[0]))
    per_image = flops / batch_sizes[0]  # conv and matmul FLOPs are linear in the batch
    print(f"device {name}; torch {torch.__version__}; model {args.model} width {args.width}; batch "
          f"{batch_sizes[0]}; {flops / 1e9:.1f} GFLOP per step ({per_image / 1e9:.3f} per image, fwd+bwd); "
          f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; inductor cache "
          f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}", flush=True)

    skipped = [{"variant": v.name, "reason": v.skip_reason(cuda)} for v in variants if v.skip_reason(cuda)]
    for s in skipped:
        print(f"  {s['variant']:44s} skipped: {s['reason']}", flush=True)
    runnable = [v for v in variants if not v.skip_reason(cuda)]
    if any(v.ddp is not None for v in runnable):
        torch_dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29577", rank=0, world_size=1,
                                      device_id=device)
    results, failed = [], []
    for b in batch_sizes:
        batches = make_batches(b)
        for v in runnable:
            try:
                r = run_variant(cfg, device, gen, batches, v, args, cuda)
            except Exception as e:  # one broken variant must not cost the others' numbers
                failed.append({"variant": v.name, "batch": b, "error": f"{type(e).__name__}: {e}"[:2000]})
                print(f"  {v.name:44s} FAILED at batch {b}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                traceback.print_exc()
                try:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                except Exception:  # a broken context fails the next variants, which say so
                    pass
                continue
            r["tflops"] = per_image * b / r["s_per_step"] / 1e12
            r["mfu"] = per_image * b / r["s_per_step"] / peak
            results.append(r)
            print(f"  {v.name:44s} b{b:<4d} {r['images_per_s']:9.0f} img/s {r['s_per_step'] * 1e3:7.2f} ms/step "
                  f"(min {r['min'] * 1e3:.2f}, max {r['max'] * 1e3:.2f}) {r['tflops']:6.1f} TFLOP/s "
                  f"MFU {100 * r['mfu']:5.1f} % warm-up {r['warmup_s']:5.1f} s"
                  + (f" (capture {r['capture_s']:.2f} s)" if r["capture_s"] is not None else "")
                  + f" {r['peak_mem_gib']:.1f} GiB loss {r['loss_last']:.3f}", flush=True)
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "model": args.model, "width": args.width,
                       "batch": batch_sizes[0], "batches": batch_sizes, "flops_per_step": flops,
                       "bf16_peak_flops": peak, "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                       "results": results, "skipped": skipped, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The compute of one training step and one evaluation: precision, optimizer, schedule, the step, exact metrics.

The trainer and `benchmarks/gpu_step.py` share these functions, so the benchmark times the trainer's own step.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data, dist
from .config import Config


def auto_amp(capability: tuple) -> str:
    """bf16 where the GPU computes it natively (compute capability 8.0, Ampere, and newer), else fp16.
    (torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, and slow: V100, T4.)"""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_amp(amp: str, device: torch.device):
    """→ (autocast dtype or None, whether fp16 needs a GradScaler)."""
    if amp == "auto":
        if device.type != "cuda":
            return None, False
        amp = auto_amp(torch.cuda.get_device_capability(device))
    if amp == "off":
        return None, False
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return dtype, dtype == torch.float16


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(cfg: Config, steps_per_epoch: int):
    """Multiplier of the peak lr at optimizer step t: linear warm-up, then linear decay to 0 (or constant)."""
    total = cfg.epochs * steps_per_epoch
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "constant":
        return lambda t: 1.0
    return lambda t: (t + 1) / (warm + 1) if t < warm else max(0.0, (total - t) / (total - warm))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, fused=cfg.fused_sgd or None)


def wrap_model(model: nn.Module, cfg: Config, device: torch.device, distributed: bool) -> nn.Module:
    """DDP across the ranks (when there are several), then torch.compile if asked."""
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if distributed else model
    return torch.compile(net) if cfg.compile else net


def prepare_batch(images: torch.Tensor, cfg: Config, gen: torch.Generator, mem) -> torch.Tensor:
    """A uint8 training batch → the model's input: normalised, augmented (if on), in memory format `mem`."""
    x = data.normalize(images)
    if cfg.augment:
        x = data.augment(x, gen, cfg.translate, cfg.cutout)
    return x.contiguous(memory_format=mem)


def train_step(model, images, labels, optimizer, scaler, criterion, amp_dtype, device):
    """One optimizer step on this rank's batch (DDP averages the gradients). Returns (loss, logits) detached."""
    with autocast(device, amp_dtype):
        logits = model(images)
        loss = criterion(logits.float(), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, fine_to_coarse: torch.Tensor, num_superclasses: int,
             channels_last: bool) -> dict:
    """Test metrics over the whole test set: each rank sums over its disjoint share, then the sums are
    all-reduced, so any world size counts every image exactly once. Also returns, under "per_superclass", the
    image count and the fine and superclass top-1 hits for each true superclass (`fine_to_coarse` maps each fine
    class to its superclass, -1 for a class the dataset does not have)."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-5 hits
    by_super = torch.zeros(3, num_superclasses, dtype=torch.float64, device=device)  # images, top-1, superclass
    for images, fine, coarse in loader:
        x = data.normalize(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        onehot = F.one_hot(coarse, num_superclasses).double()  # a matmul, not bincount: deterministic on GPUs too
        by_super += torch.stack([onehot.sum(0), (top5[:, 0] == fine).double() @ onehot,
                                 (fine_to_coarse[top5[:, 0]] == coarse).double() @ onehot])
        sums += torch.stack([F.cross_entropy(logits, fine, reduction="sum").double(),
                             (top5 == fine[:, None]).any(dim=1).sum().double()])
    reduced = dist.all_reduce_sum(torch.cat([sums, by_super.flatten()]))
    (loss, top5), by_super = reduced[:2].tolist(), reduced[2:].view(3, num_superclasses)
    images, top1, sup = by_super.sum(1).tolist()
    return {"test_loss": loss / images, "test_top1": 100 * top1 / images, "test_top5": 100 * top5 / images,
            "test_super_top1": 100 * sup / images, "test_count": int(images),
            "per_superclass": {k: [int(v) for v in row] for k, row in
                               zip(("images", "top1_hits", "super_top1_hits"), by_super.tolist(), strict=True)}}

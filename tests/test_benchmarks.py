"""benchmarks/gpu_step.py: its smoke run on the CPU, and the FLOP count behind its MFU."""
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ddp_train.models import build_model

ROOT = Path(__file__).resolve().parent.parent


def conv_linear_macs(model: nn.Module) -> tuple:
    """Multiply-accumulates of one 32×32 image's forward pass, from the layers' own shapes: (all, the stem conv)."""
    macs = []

    def hook(m, _, out):
        if isinstance(m, nn.Conv2d):
            macs.append(out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        else:
            macs.append(m.in_features * m.out_features)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.zeros(1, 3, 32, 32))
    return sum(macs), macs[0]


def test_gpu_step_smoke_run_counts_forward_and_backward_flops(tmp_path):
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--only", "default,fp16", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["width"] == 8
    assert [v["variant"] for v in res["results"]] == ["bf16 channels_last (default)", "fp16+scaler channels_last"]
    assert all(v["images_per_s"] > 0 for v in res["results"])
    # forward 2·MACs; backward twice that, except the stem's input gradient (the images need none)
    macs, stem = conv_linear_macs(build_model("resnet18", 100, width=8))
    assert res["flops_per_step"] == res["batch"] * 2 * (3 * macs - stem)

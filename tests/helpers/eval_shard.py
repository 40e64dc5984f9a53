"""ddp_train.step.evaluate of a fixed BatchNorm ResNet on the test beton in argv[1] through the loader argv[3] (ffcv or
resident); rank 0 writes JSON to argv[2]."""
import json
import sys

import torch

from data_prep.manifest import verify
from ddp_train import data, dist, step
from ddp_train.models import build_model

d = dist.from_env()
dist.init(d, 120)
manifest = verify(sys.argv[1])
torch.manual_seed(0)
model = build_model("resnet18", 100, width=8).to(memory_format=torch.channels_last)
with torch.no_grad():  # non-trivial BatchNorm statistics, identical on every rank
    model(torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last))
if sys.argv[3] == "resident":
    from ddp_train.resident import ResidentTest
    loader = ResidentTest(f"{sys.argv[1]}/cifar100_test.beton", 128, d.device, d.rank, d.world_size)
else:
    loader = data.test_loader(sys.argv[1], 128, 1, d.rank, d.world_size, d.device)
metrics = step.evaluate(model, loader, d.device, None, torch.tensor(manifest["fine_to_coarse"]),
                        len(manifest["coarse_label_names"]), True)
if d.master:
    with open(sys.argv[2], "w") as f:
        json.dump(metrics, f)
dist.barrier()  # leave together: a gloo peer torn down while the other is still busy can abort the process
dist.cleanup()

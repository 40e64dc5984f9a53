"""Two optimizer steps through ddp_train.step.train_step on a fixed batch of 16, split evenly over the ranks.
Rank 0 saves the parameters to argv[1]. GroupNorm makes the forward pass independent of the batch split."""
import sys

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_train import dist, step
from ddp_train.config import Config
from ddp_train.models import build_model

d = dist.from_env()
dist.init(d, 120)
torch.manual_seed(0)
model = build_model("resnet18", 100, width=8, norm="gn").to(memory_format=torch.channels_last)
g = torch.Generator().manual_seed(1)
x = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 100, (16,), generator=g)
per = 16 // d.world_size
xs, ys = x[d.rank * per:(d.rank + 1) * per], y[d.rank * per:(d.rank + 1) * per]
net = DDP(model) if d.distributed else model
cfg = Config(lr=0.5, momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.1)
opt = step.make_optimizer(cfg, model)
scaler = torch.amp.GradScaler("cpu", enabled=False)
crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
for _ in range(2):
    step.train_step(net, xs, ys, opt, scaler, crit, None, d.device)
if d.master:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[1])
dist.barrier()  # leave together: a gloo peer torn down while the other is still busy can abort the process
dist.cleanup()

"""The step's parts in this process (the whole step is covered by test_dist and the trainer tests)."""
import copy

import torch

from ddp_train import config, step
from ddp_train.models import build_model


def test_fused_sgd_takes_the_same_steps_as_the_default_optimizer():
    cfg, _ = config.parse_args(["--width", "8"])
    fused_cfg, _ = config.parse_args(["--width", "8", "--fused-sgd"])
    torch.manual_seed(0)
    model = build_model("resnet18", 100, 8, "bn")
    other, before = copy.deepcopy(model), [p.detach().clone() for p in model.parameters()]
    default, fused = step.make_optimizer(cfg, model), step.make_optimizer(fused_cfg, other)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
        for m, opt in ((model, default), (other, fused)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert any((a != b).any() for a, b in zip(model.parameters(), before, strict=True))  # the steps moved the weights

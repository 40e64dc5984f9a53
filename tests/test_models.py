"""models: shapes, channels_last, the seed preset's architecture."""
import pytest
import torch

from ddp_train.models import Seed2018, build_model


@pytest.mark.parametrize("name, norm", [("resnet18", "bn"), ("resnet18", "gn"), ("seed2018", "bn")])
def test_forward_backward_channels_last(name, norm):
    model = build_model(name, 100, width=8, norm=norm).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (4, 100)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_has_the_standard_size():
    n = sum(p.numel() for p in build_model("resnet18", 100).parameters())
    assert 11_150_000 < n < 11_250_000  # CIFAR ResNet-18 with 100 classes: 11.2 M parameters


def test_seed2018_layout():
    m = Seed2018()
    assert [len(stage) for stage in m.layers] == [2, 4, 4, 2]
    assert [stage[0].conv1.out_channels for stage in m.layers] == [32, 64, 128, 256]
    assert isinstance(m.stem[3], torch.nn.Dropout2d) and m.stem[3].p == 0.02
    assert m.pool.kernel_size == 4 and m.pool.stride == 1 and m.fc.in_features == 256


def test_groupnorm_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    m = build_model("resnet18", 100, width=8, norm="gn").train()
    x = torch.randn(8, 3, 32, 32)
    assert torch.allclose(m(x)[:4], m(x[:4]), atol=1e-5)

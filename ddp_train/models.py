"""ResNet-18 with a CIFAR stem (default) and the 2018 seed ResNet."""
import torch.nn as nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    # GroupNorm's output does not depend on the batch, so DDP on half-batches equals one process on the full batch.
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(min(32, channels // 4) or 1, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(cin: int, cout: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, norm)
                           for i in range(blocks)])


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs: a 3×3 stride-1 stem and no max-pool, stages at w, 2w, 4w, 8w channels."""

    def __init__(self, num_classes: int = 100, width: int = 64, norm: str = "bn"):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), norm_layer(norm, w), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(_stage(w, w, 2, 1, norm), _stage(w, 2 * w, 2, 2, norm),
                                    _stage(2 * w, 4 * w, 2, 2, norm), _stage(4 * w, 8 * w, 2, 2, norm))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class Seed2018(nn.Module):
    """The 2018 trainer's ResNet: 32-channel stem with Dropout2d(0.02), BasicBlocks [2, 4, 4, 2] at 32/64/128/256
    channels, MaxPool(4, stride 1) over the final 4×4 map, FC 256→100."""

    def __init__(self, num_classes: int = 100, norm: str = "bn"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), norm_layer(norm, 32), nn.ReLU(inplace=True),
                                  nn.Dropout2d(0.02))
        self.layers = nn.Sequential(_stage(32, 32, 2, 1, norm), _stage(32, 64, 4, 2, norm),
                                    _stage(64, 128, 4, 2, norm), _stage(128, 256, 2, 2, norm))
        self.pool = nn.MaxPool2d(4, stride=1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def build_model(name: str, num_classes: int = 100, width: int = 64, norm: str = "bn") -> nn.Module:
    if name == "resnet18":
        return ResNet18(num_classes, width, norm)
    if name == "seed2018":
        return Seed2018(num_classes, norm)
    raise ValueError(f"unknown model '{name}'")

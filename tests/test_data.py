"""ddp_train.data: the on-device augmentation and the loaders' sharding."""
import numpy as np
import torch

from ddp_train import data


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)


def test_normalize_uses_the_cifar100_statistics():
    x = torch.full((1, 3, 32, 32), 0, dtype=torch.uint8)
    out = data.normalize(x)
    assert torch.allclose(out[0, :, 0, 0], -torch.tensor(data.MEAN) / torch.tensor(data.STD), atol=1e-6)


def test_augment_is_a_function_of_the_generator_seed():
    x = data.normalize(batch())
    a = data.augment(x, data.epoch_generator(0, 3, 1, x.device), 2, 4)
    b = data.augment(x, data.epoch_generator(0, 3, 1, x.device), 2, 4)
    c = data.augment(x, data.epoch_generator(0, 4, 1, x.device), 2, 4)
    d = data.augment(x, data.epoch_generator(0, 3, 0, x.device), 2, 4)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert a.shape == x.shape and a.is_contiguous(memory_format=torch.channels_last)


def test_flip_only_flips_about_half():
    x = data.normalize(batch(1000))
    out = data.augment(x, torch.Generator().manual_seed(0), translate=0, cutout=0)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same | flipped) and 400 < flipped.sum() < 600


def test_translate_shifts_within_bounds_and_fills_with_the_mean():
    x = data.normalize(batch(200))
    out = data.augment(x, torch.Generator().manual_seed(1), translate=2, cutout=0)
    for i in range(len(x)):
        found = False
        for src in (x[i], x[i].flip(2)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    shifted = torch.zeros_like(src)
                    ys, yd = slice(max(0, dy), 32 + min(0, dy)), slice(max(0, -dy), 32 + min(0, -dy))
                    xs, xd = slice(max(0, dx), 32 + min(0, dx)), slice(max(0, -dx), 32 + min(0, -dx))
                    shifted[:, yd, xd] = src[:, ys, xs]
                    found = found or torch.equal(shifted, out[i])
        assert found, f"image {i} is not a flip/shift of its source"


def test_cutout_zeroes_at_most_a_square_of_the_given_side():
    x = torch.ones(500, 3, 32, 32)
    out = data.augment(x, torch.Generator().manual_seed(2), translate=0, cutout=4)
    zeros = (out[:, 0] == 0)
    per_image = zeros.flatten(1).sum(1)
    assert per_image.max() == 16 and per_image.min() >= 4   # a 4×4 square, clipped at the border
    assert torch.all(zeros == (out == 0).all(1))            # the same square in every channel


def test_test_shards_cover_every_image_once(synthetic_data):
    seen = []
    for rank in range(3):
        loader = data.test_loader(str(synthetic_data), 300, 1, rank, 3, torch.device("cpu"))
        assert len(loader.indices) == len(np.arange(rank, 1000, 3))
        seen.extend(loader.indices.tolist())
    assert sorted(seen) == list(range(1000))

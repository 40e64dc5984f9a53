"""ddp_train.resident against the real FFCV loaders: the same bytes, the same batches, the same order."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep import manifest as manifest_lib
from data_prep.beton import read_beton
from data_prep.cifar import DataError
from ddp_train import data, errors, resident

from conftest import ROOT, TORCHRUN, run

CPU = torch.device("cpu")
SEED = 5


def beton(data_dir, split):
    return str(data_dir / manifest_lib.beton_name(split))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
            and torch.equal(a, b))


@pytest.fixture(scope="module")
def read_back(synthetic_data):
    """Both splits as data_prep reads them back (an FFCV Loader each)."""
    return {split: read_beton(beton(synthetic_data, split)) for split in ("train", "test")}


@pytest.fixture(scope="module")
def train(synthetic_data):
    return resident.ResidentTrain(beton(synthetic_data, "train"), 128, SEED, CPU)


def test_read_back_equals_read_beton(train, read_back, synthetic_data):
    images, fine, _ = read_back["train"]
    assert np.array_equal(train.images.numpy(), images) and np.array_equal(train.fine.numpy(), fine)
    test = resident.ResidentTest(beton(synthetic_data, "test"), 100, CPU)
    for mine, theirs in zip((test.images, test.fine, test.coarse), read_back["test"], strict=True):
        assert np.array_equal(mine.numpy(), theirs)


def test_read_back_when_the_file_order_is_not_the_sample_order(tmp_path):
    """Two writer workers filling their own pages in turns (as data_prep's full-size betons are written) store the
    samples out of id order: the reader must follow the data pointers."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    path = tmp_path / "interleaved.beton"
    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), i % 100, i % 20) for i in range(3000)]
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "fine_label": IntField(),
                              "coarse_label": IntField()}, num_workers=2).from_indexed_dataset(samples, chunksize=50)
    test = resident.ResidentTest(str(path), 1000, CPU)
    for mine, theirs in zip((test.images, test.fine, test.coarse), read_beton(path), strict=True):
        assert np.array_equal(mine.numpy(), theirs)
    assert np.array_equal(test.images.numpy(), np.stack([s[0] for s in samples]))


def test_train_batches_equal_the_ffcv_loader(train, synthetic_data):
    ffcv = data.train_loader(str(synthetic_data), 128, 1, SEED, CPU, distributed=False)
    assert len(train) == len(ffcv) == 2000 // 128
    for epoch in (0, 1):
        ffcv.next_epoch = train.next_epoch = epoch
        batches = 0
        for (a, b), (x, y) in zip(ffcv, train, strict=True):
            assert same(a, x) and same(b, y), f"epoch {epoch} batch {batches}"
            batches += 1
        assert batches == len(ffcv) and ffcv.next_epoch == train.next_epoch == epoch + 1
    assert x.dtype == torch.uint8 and x.shape == (128, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (128,)


def expected_distributed_order(n, seed, epoch, rank, world_size, batches, batch):
    """torch's DistributedSampler(shuffle=True, drop_last=False) spelled out: a seeded randperm, padded by repeating
    it to a multiple of the world size, every world_size-th from rank; then FFCV's cut to full batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    padded = np.resize(perm, math.ceil(n / world_size) * world_size)  # np.resize repeats the array
    return padded[rank::world_size][:batches * batch]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_order_is_torch_distributed_sampler(world_size, synthetic_data, read_back):
    images, fine, _ = read_back["train"]
    batch = 96
    served = {0: [], 1: []}
    for rank in range(world_size):
        mine = resident.ResidentTrain(beton(synthetic_data, "train"), batch, SEED, CPU, rank, world_size,
                                      distributed=True)
        assert len(mine) == math.ceil(2000 / world_size) // batch
        for epoch in (0, 1):
            order = expected_distributed_order(2000, SEED, epoch, rank, world_size, len(mine), batch)
            assert np.array_equal(mine.order(epoch), order)
            mine.next_epoch = epoch
            got = list(mine)
            assert len(got) == len(mine)
            x = torch.cat([b[0] for b in got]).permute(0, 2, 3, 1).numpy()
            y = torch.cat([b[1] for b in got]).numpy()
            assert np.array_equal(x, images[order]) and np.array_equal(y, fine[order])
            served[epoch].extend(order.tolist())
    for epoch in (0, 1):  # the ranks split the epoch without overlap (the padding repeats fall in the cut here)
        assert len(set(served[epoch])) == len(served[epoch]) == len(mine) * batch * world_size
    assert served[0] != served[1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_test_shards_cover_each_image_once(world_size, synthetic_data, read_back):
    images, fine, coarse = read_back["test"]
    seen = []
    for rank in range(world_size):
        test = resident.ResidentTest(beton(synthetic_data, "test"), 150, CPU, rank, world_size)
        idx = np.arange(rank, 1000, world_size, dtype=np.uint64)
        assert test.indices.dtype == idx.dtype and np.array_equal(test.indices, idx)
        batches = list(test)
        assert len(batches) == len(test) == math.ceil(len(idx) / 150)
        assert [len(b[0]) for b in batches[:-1]] == [150] * (len(batches) - 1)  # only the last is partial
        x, f, c = (torch.cat(parts) for parts in zip(*batches, strict=True))
        assert x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last)
        assert f.dtype == c.dtype == torch.int64 and f.shape == c.shape == (len(idx),)
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images[idx.astype(np.int64)])
        assert np.array_equal(f.numpy(), fine[idx.astype(np.int64)])
        assert np.array_equal(c.numpy(), coarse[idx.astype(np.int64)])
        seen.extend(test.indices.tolist())
    assert sorted(seen) == list(range(1000))


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_batches_equal_ffcv_under_torchrun(world_size, synthetic_data, tmp_path):
    """Real ranks, FFCV's Loader(distributed=True): 3 ranks do not divide 2,000 train or 1,000 test images."""
    run([TORCHRUN, "--standalone", f"--nproc_per_node={world_size}", ROOT / "tests/helpers/resident_vs_ffcv.py",
         synthetic_data, tmp_path], cwd=ROOT, check=True, timeout=300)
    served = {}
    for rank in range(world_size):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["mismatches"] == [] and r["test_indices_equal"]
        assert r["len"][0] == r["len"][1] == math.ceil(2000 / world_size) // 64 and r["batches"] == 2 * r["len"][0]
        assert r["test_len"][0] == r["test_len"][1] == math.ceil(len(range(rank, 1000, world_size)) / 150)
        for epoch, ids in r["order"].items():
            served.setdefault(epoch, []).extend(ids)
    assert all(len(set(ids)) == len(ids) for ids in served.values())


def test_jpeg_beton_is_refused_with_one_line(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    path = tmp_path / "jpeg.beton"
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), i, i) for i in range(8)]
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg"), "fine_label": IntField(),
                              "coarse_label": IntField()}, num_workers=1).from_indexed_dataset(samples)
    for make in (lambda: resident.ResidentTrain(str(path), 4, 0, CPU), lambda: resident.ResidentTest(str(path), 4, CPU),
                 lambda: resident.ResidentTrain.device_bytes(str(path))):
        with pytest.raises(DataError) as e:
            make()
        assert isinstance(e.value, errors.JobError) and e.value.exit_code == 1
        assert "JPEG" in str(e.value) and "python -m data_prep" in str(e.value) and "\n" not in str(e.value)


def test_device_bytes_come_from_the_metadata(train, synthetic_data):
    order = train.order(0)
    assert resident.ResidentTrain.device_bytes(beton(synthetic_data, "train")) == (
        train.images.nbytes + train.fine.nbytes + len(train.indices) * order.itemsize)
    test = resident.ResidentTest(beton(synthetic_data, "test"), 100, CPU, 2, 3)
    assert resident.ResidentTest.device_bytes(beton(synthetic_data, "test"), 2, 3) == (
        test.images.nbytes + test.fine.nbytes + test.coarse.nbytes)
    assert resident.fits("cpu", 10 ** 15) and resident.fits(CPU, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu_the_same_batches_without_a_host_sync(train, synthetic_data):
    gpu = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(gpu)
    assert resident.fits(gpu, free // 4) and not resident.fits(gpu, free)
    mine = resident.ResidentTrain(beton(synthetic_data, "train"), 128, SEED, gpu)
    train.next_epoch = mine.next_epoch = 1
    batches = iter(mine)  # the epoch's order goes to the device here
    torch.cuda.set_sync_debug_mode("error")  # any host sync while serving batches raises
    try:
        got = [(x, y) for x, y in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (a, b), (x, y) in zip(train, got, strict=True):
        assert x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, x.cpu()) and torch.equal(b, y.cpu())


def test_the_beton_header_is_read_as_ffcv_reads_it_without_importing_ffcv(synthetic_data):
    """numba compiles at ffcv's import (seconds of start-up): the resident path reads the layout with numpy alone."""
    code = ("import sys; from ddp_train import resident; "
            f"b = resident._Beton('{synthetic_data}/cifar100_test.beton'); "
            "print(b.field_names, len(b.metadata), 'ffcv' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['image',", "'fine_label',", "'coarse_label']", "1000", "False"]
    from ffcv.reader import Reader
    for split in ("train", "test"):
        path = f"{synthetic_data}/cifar100_{split}.beton"
        ours, theirs = resident._Beton(path), Reader(path)
        assert ours.field_names == theirs.field_names
        for i in range(3):
            assert np.array_equal(ours.metadata[f"f{i}"], theirs.metadata[f"f{i}"])

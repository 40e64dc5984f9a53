"""Under torchrun: every batch of epochs 0 and 1 of ResidentTrain(distributed=True) against data.train_loader's
distributed FFCV Loader, and ResidentTest against data.test_loader, on this rank. argv: data dir, output dir;
each rank writes rank<r>.json with what it compared and the sample ids it served."""
import json
import sys
from pathlib import Path

import torch

from data_prep import manifest as manifest_lib
from ddp_train import data, dist, resident

BATCH, TEST_BATCH = 64, 150

data_dir, out = sys.argv[1], Path(sys.argv[2])
d = dist.from_env()
dist.init(d, 120)
cpu = torch.device("cpu")
train_path = str(Path(data_dir) / manifest_lib.beton_name("train"))
test_path = str(Path(data_dir) / manifest_lib.beton_name("test"))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


report = {"rank": d.rank, "world_size": d.world_size, "mismatches": [], "batches": 0, "order": {}}
ffcv = data.train_loader(data_dir, BATCH, 1, 7, cpu, distributed=True)
mine = resident.ResidentTrain(train_path, BATCH, 7, cpu, d.rank, d.world_size, distributed=True)
report["len"] = [len(ffcv), len(mine)]
for epoch in (0, 1):
    ffcv.next_epoch = mine.next_epoch = epoch
    report["order"][epoch] = mine.order(epoch).tolist()
    n = 0
    for i, ((a, b), (x, y)) in enumerate(zip(ffcv, mine, strict=True)):
        if not (same(a, x) and same(b, y)):
            report["mismatches"].append(f"train epoch {epoch} batch {i}")
        n += 1
    report["batches"] += n

ffcv_test = data.test_loader(data_dir, TEST_BATCH, 1, d.rank, d.world_size, cpu)
mine_test = resident.ResidentTest(test_path, TEST_BATCH, cpu, d.rank, d.world_size)
report["test_indices_equal"] = bool((ffcv_test.indices == mine_test.indices).all())
report["test_len"] = [len(ffcv_test), len(mine_test)]
for i, (a, b) in enumerate(zip(ffcv_test, mine_test, strict=True)):
    if not all(same(u, v) for u, v in zip(a, b, strict=True)):
        report["mismatches"].append(f"test batch {i}")
(out / f"rank{d.rank}.json").write_text(json.dumps(report))
dist.barrier()  # leave together: a gloo peer torn down while the other is still busy can abort the process
dist.cleanup()

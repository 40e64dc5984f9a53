"""The GPU benchmarks on the CPU: gpu_step.py's smoke run and the FLOP count behind its MFU, peers.py's smoke run
(real trainer processes with both loaders, a real DataLoader loop) and the docs table it writes, and
gpu_session.sh's dry run (its shell logic and every stage's arguments). Numbers measured here mean nothing."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn as nn

from ddp_train.models import build_model

ROOT = Path(__file__).resolve().parent.parent
# one intra-op thread: two on the two shared cores of a busy CI machine ran the CPU smoke step 15× slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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
    r = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--only", "default,fp16,SGD fused,CUDA graph,"
                        "reduce-overhead", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["width"] == 8
    assert [v["variant"] for v in res["results"]] == ["bf16 channels_last (default)", "fp16+scaler channels_last",
                                                      "bf16 cl SGD fused"]
    assert all(v["images_per_s"] > 0 and v["warmup_s"] > 0 for v in res["results"])
    # the CUDA-only variants of the table are wired: selected, listed as skipped with their reason, not run
    assert {s["variant"]: s["reason"].split(":")[0] for s in res["skipped"]} == {
        "bf16 cl CUDA graph from the augmented batch": "CUDA graphs need a CUDA device",
        "bf16 cl CUDA graph with augmentation": "CUDA graphs need a CUDA device",
        "bf16 cl compile reduce-overhead": "mode reduce-overhead captures CUDA graphs"}
    assert res["failed"] == []
    # forward 2·MACs; backward twice that, except the stem's input gradient (the images need none)
    macs, stem = conv_linear_macs(build_model("resnet18", 100, width=8))
    assert res["flops_per_step"] == res["batch"] * 2 * (3 * macs - stem)


def test_gpu_step_lists_its_variants_and_refuses_an_empty_selection():
    r = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--list", "--only", "DDP"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 6 and "skipped here: DDP here runs over a one-rank NCCL group" in r.stdout
    r = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--only", "no such variant"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no variant matches")


def test_peers_smoke_run_measures_every_part_and_writes_its_table(tmp_path):
    out = tmp_path / "peers"
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "numbers below are meaningless" in r.stdout
    res = json.loads((out / "peers.json").read_text())
    assert res["smoke"] and res["device"] == "cpu" and res["recipe"]["epochs"] == 2
    for loader in ("resident", "ffcv"):
        t = res["trainer"][loader]
        assert t["exit"] == 0 and len(t["images_per_s_epochs"]) == 2 and t["images_per_s"] > 0
        assert f"--loader {loader} --no-mlflow" in t["cmd"]
        # the trainer's own time budget, read from its run directory; its phases sum to about the process's wall
        assert t["budget"]["training"] > 0 and t["budget"]["loaders"] >= 0
        assert 0 < t["budget_total_s"] <= t["wall_s"] + 1
    assert res["plain"]["images_per_s"] > 0 and len(res["plain"]["images_per_s_epochs"]) == 2
    assert "pin_memory=False" in res["plain"]["loader"]
    assert res["step"]["images_per_s"] > 0
    assert set(res["ratios"]) == {"resident/plain", "resident/step", "ffcv/plain", "ffcv/step"}
    table = (out / "peers.md").read_text()
    assert table.startswith("**CPU smoke run: these numbers are meaningless**")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| trainer `--loader resident` | ") and "s for 2 epochs |" in line for line in rows)
    assert any(line.startswith("| plain loop (DataLoader, 1 workers") for line in rows)
    assert any(line.startswith("| steady training | ") for line in rows)

    # a smoke (CPU) run's table never reaches the docs
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n\n<!-- peers:begin -->\nnot measured yet\n<!-- peers:end -->\n\nmore\n")
    before = docs.read_text()
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--from-json", str(out / "peers.json"),
                        "--write-docs", "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --write-docs takes GPU results only")
    assert len(r.stderr.strip().splitlines()) == 1 and docs.read_text() == before

    # GPU results (the same file relabelled) replace what lies between the markers, and nothing else
    gpu = {**res, "smoke": False, "device": "NVIDIA Test GPU"}
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    r = subprocess.run([sys.executable, "benchmarks/peers.py", "--from-json", str(tmp_path / "gpu.json"),
                        "--write-docs", "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = docs.read_text()
    assert text.startswith("# Performance\n\n<!-- peers:begin -->\nMeasured by `benchmarks/peers.py`")
    assert text.endswith("<!-- peers:end -->\n\nmore\n") and "**NVIDIA Test GPU**" in text
    assert "not measured yet" not in text and "meaningless" not in text


def test_peers_bad_input_is_one_error_line(tmp_path):
    for args, words in ((["--smoke", "--parts", "resident,nope"], "--parts: unknown part(s) nope"),
                        (["--smoke", "--epochs", "1"], "--epochs and --plain-epochs must be at least 2"),
                        (["--smoke", "--write-docs"], "--write-docs writes a finished run's table")):
        r = subprocess.run([sys.executable, "benchmarks/peers.py", *args, "--out", str(tmp_path / "o")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {words}"), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def session(tmp_path, **env):
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**ENV, "DRY_RUN": "1", "PY": sys.executable, "OUT": str(out), "WORK": str(work),
                            **env})
    return r, out, work


def test_gpu_session_dry_run_checks_every_stage_and_returns_few_files(tmp_path):
    r, out, work = session(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = re.findall(r"^=== ([\w-]+) \(limit (\d+)s\): (.*)$", r.stdout, re.M)
    assert [s[0] for s in stages] == ["variants", "graph", "prep", "default40", "default40-fused", "peers",
                                      "compile_1", "compile_2", "autotune_1", "autotune_2"]
    assert sum(int(s[1]) for s in stages) > 480  # the deadline, not the stages' own limits, bounds the session
    cmds = {s[0]: s[2] for s in stages}
    assert "--batch 512,256,128,64" in cmds["graph"] and "--epochs 40" in cmds["peers"]
    assert "ddp_train.launch" in cmds["default40"] and "--no-mlflow" in cmds["default40"]  # dry run: no MLflow check
    assert cmds["default40-fused"] == cmds["default40"].replace("--run-name default40", "--run-name default40-fused") \
        + " --fused-sgd"  # the candidate default against the default, nothing else changed
    # each gpu_step.py selection was checked against the variant table, the peers plan against peers.py
    assert "CUDA graph with augmentation" in (work / "graph.variants").read_text()
    assert "max-autotune-no-cudagraphs" in (work / "autotune_1.variants").read_text()
    assert "compile" not in (work / "variants.variants").read_text()
    plan = (work / "peers.plan").read_text().splitlines()
    assert len(plan) == 4 and "--loader resident" in plan[0] and "--loader ffcv" in plan[3]
    # what the device returns: at most 8 plain files, directly in $OUT, with plain names
    files = sorted(p.name for p in out.iterdir())
    assert files == ["session.tar.gz", "summary.txt"] and all(p.is_file() for p in out.iterdir())
    with tarfile.open(out / "session.tar.gz") as tar:
        names = tar.getnames()
    assert "./logs/peers.log" in names and "./session.log" in names and "./summary.txt" in names


def test_gpu_session_parts_and_deadline(tmp_path):
    r, _, _ = session(tmp_path, PARTS="default40 autotune", DEADLINE="5")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"^=== ([\w-]+): skipped, -?\d+ s left", r.stdout, re.M) == [
        "prep", "default40", "default40-fused", "autotune_1", "autotune_2"]

"""torchrun with 2 gloo ranks on CPU equals one process with the same global batch (loss and weights to 1e-5)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.finetune import FinetuneConfig, finetune
from engine.finetune.checkpoint import read_log
from engine.finetune.synthetic import make_shapes_dataset
from engine.models import load_model

REPO = Path(__file__).resolve().parents[1]


# Adam divides each update by the root of its second moment, so a last-bit difference in a near-zero gradient
# (two ranks sum the batch in another order than one process) moves that weight by a fraction of lr: at 1e-3 the
# patch-embedding weights of tiny differed by 1.7e-5 on an AMD EPYC (AVX-512), at 1e-4 by 1.7e-6. A real error
# (negatives not gathered, a gradient not reduced) moves weights by about lr per step, far above 1e-5.
LR = 1e-4


def test_two_gloo_ranks_match_one_process(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", {"train": 1}, image_size=32, templates=1, seed=9)
    common = dict(model="tiny", data=data, train_split="train", valid_split=None, stage1_steps=2, stage2_steps=2,
                  batch_size=8, lr=LR, warmup_steps=1, dropout=0.0, grad_cache_chunk=2, seed=3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "engine.finetune", "--model", "tiny", "--data", str(data), "--valid-split", "none",
               "--out", str(tmp_path / "two"), "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "8",
               "--lr", str(LR), "--warmup", "1", "--dropout", "0", "--grad-cache-chunk", "2", "--seed", "3",
               "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run with OMP_NUM_THREADS=1: the same GEMM reduction order per rank
    try:
        one = finetune(FinetuneConfig(out=tmp_path / "one", progress=False, **common))
    finally:
        torch.set_num_threads(threads)
    losses = {name: [r["loss"] for r in read_log(tmp_path / name / "log.jsonl") if "loss" in r]
              for name in ("one", "two")}
    assert len(losses["one"]) == 4
    assert max(abs(a - b) for a, b in zip(losses["one"], losses["two"])) < 1e-5, losses
    a = torch.load(one.latest, weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert b["finetune"]["world_size"] == 2 and len(b["finetune"]["rng"]) == 2
    worst = max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"])
    assert worst < 1e-5, worst
    start = load_model(None, "tiny").model.state_dict()
    assert any(not torch.equal(start[k], a["state_dict"][k]) for k in start if k.startswith("visual."))
    moved = max(float((a["state_dict"][k] - start[k]).abs().max()) for k in start)
    assert moved > 10 * worst and moved > 1e-4, (moved, worst)  # the tolerance is far below what training moved

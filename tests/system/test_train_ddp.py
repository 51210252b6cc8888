"""Two ranks under torchrun (gloo, CPU) train the adapter that one process trains on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_runs import ROOT
from models import WORDS
from training import assert_within_budget

from adalora_export.sources import load_adapter
from adalora_export.training import train

pytestmark = pytest.mark.slow  # a system test: subprocesses, kills or torchrun

OPTIONS = {
    "max_steps": 10,
    "grad_accum": 2,
    "lr": 1e-2,
    "max_length": 16,
    "seed": 7,
    "save_steps": 5,
    "adalora_init_r": 4,
    "adalora_target_r": 2,
    "adalora_tinit": 2,
    "adalora_tfinal": 3,  # shrink at step 7; DDP is rebuilt and trains 3 more steps at the final ranks
    "adalora_deltaT": 1,
}


def test_two_ranks_match_one_process(tmp_path, llama_base):
    base = llama_base
    data = tmp_path / "train.jsonl"
    rng = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 10, (40,), generator=rng)  # ragged: the global token count must normalize the loss
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=rng)) for n in lengths]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))

    ddp_dir = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "cli.py", "train"]
    argv += ["--model", str(base), "--data", str(data), "--output", str(ddp_dir), "--batch_size", "2"]
    argv += [f"--{k}={v}" for k, v in OPTIONS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 10 steps") == 1  # only rank 0 reports (and writes)

    single = train(tmp_path / "single", model=base, data=data, batch_size=4, progress=False, **OPTIONS)
    masks = [json.loads((d / "rank_pattern.json").read_text())["frozen_mask"] for d in (ddp_dir, tmp_path / "single")]
    assert masks[0] == masks[1]
    ddp, one = load_adapter(ddp_dir / "adapter"), load_adapter(tmp_path / "single" / "adapter")
    assert ddp.rank_pattern == one.rank_pattern == single.ranks
    assert_within_budget(tmp_path / "single")
    for path, module in one.modules.items():
        for name in ("A", "E", "B"):
            torch.testing.assert_close(getattr(ddp.modules[path], name), getattr(module, name), atol=1e-5, rtol=0)
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (ddp_dir, tmp_path / "single")
    ]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)

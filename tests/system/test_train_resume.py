"""A training process killed with SIGKILL and resumed ends byte-identical to one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_runs import ROOT
from models import WORDS
from training import assert_within_budget

from adalora_export.formats.state import list_checkpoints
from adalora_export.training import train

pytestmark = pytest.mark.slow  # a system test: subprocesses, kills or torchrun

OPTIONS = {
    "max_steps": 30,
    "batch_size": 4,
    "lr": 1e-2,
    "max_length": 16,
    "seed": 5,
    "save_steps": 4,
    "keep_checkpoints": 2,
    "adalora_init_r": 4,
    "adalora_target_r": 2,
    "adalora_tinit": 4,
    "adalora_tfinal": 10,  # the final shrink happens at step 20, after the kill
    "adalora_deltaT": 2,
    "lora_dropout": 0.1,  # so that the RNG state matters too
}


def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny_base):
    base = tiny_base(hidden=48)
    data = tmp_path / "train.jsonl"
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=rng)) for _ in range(64)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))

    run_dir = tmp_path / "killed"
    argv = [sys.executable, "cli.py", "train", "--model", str(base), "--data", str(data), "--output", str(run_dir)]
    argv += [f"--{k}={v}" for k, v in OPTIONS.items()]
    # The same number of threads as this process: float sums must run in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run_dir / "checkpoint-8").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (run_dir / "final").exists()
    assert list_checkpoints(run_dir)[-1].name.startswith("checkpoint-")

    resumed = train(run_dir, resume=True, progress=False)
    assert resumed.total_step == 30
    reference_dir = tmp_path / "reference"
    train(reference_dir, model=base, data=data, progress=False, **OPTIONS)
    for name in ("adapter_model.safetensors", "adapter_config.json", "adalora_manifest.json"):
        assert (run_dir / "adapter" / name).read_bytes() == (reference_dir / "adapter" / name).read_bytes(), name
    assert_within_budget(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # records of the steps redone after the kill are not duplicated

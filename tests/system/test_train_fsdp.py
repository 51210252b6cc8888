"""``train --fsdp``: two ranks under torchrun (gloo, CPU) with the base sharded by FSDP2 train the adapter
that one process trains on the same global batch, and a resumed FSDP run ends byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_runs import ROOT, run_cli
from models import WORDS

from adalora_export.sources import load_adapter
from adalora_export.training import train

pytestmark = pytest.mark.slow  # a system test: subprocesses, kills or torchrun

OPTIONS = {
    "max_steps": 10,
    "grad_accum": 2,
    "lr": 1e-2,
    "max_length": 16,
    "seed": 7,
    "save_steps": 4,  # checkpoints 4, 8 (after the final shrink) and 10
    "keep_checkpoints": 0,
    "adalora_init_r": 4,
    "adalora_target_r": 2,
    "adalora_tinit": 2,
    "adalora_tfinal": 3,  # the final shrink at step 7; 3 more steps at the final ranks, nothing re-sharded
    "adalora_deltaT": 1,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "cli.py", "train"]


def write_texts(path, n, seed):
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 10, (n,), generator=rng)  # ragged: the global token count normalizes the loss
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=rng)) for k in lengths]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def torchrun(*flags):
    proc = subprocess.run([*TORCHRUN, *map(str, flags)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, llama_base):
    """(run dir, train data, validation data) of one uninterrupted two-rank FSDP run."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data, val = write_texts(tmp / "train.jsonl", 40, 1), write_texts(tmp / "val.jsonl", 5, 2)  # 5: 3 + 2 per rank
    out = tmp / "fsdp"
    flags = ["--model", llama_base, "--data", data, "--validation", val, "--output", out, "--batch_size", 2, "--fsdp"]
    proc = torchrun(*flags, *[f"--{k}={v}" for k, v in OPTIONS.items()])
    assert proc.stdout.count("trained 10 steps") == 1  # only rank 0 reports (and writes)
    assert "base sharded with FSDP2" in proc.stderr
    return out, data, val


def test_fsdp_two_ranks_match_one_process(tmp_path, llama_base, fsdp_run):
    out, data, val = fsdp_run
    single = train(
        tmp_path / "single", model=llama_base, data=data, validation=val, batch_size=4, progress=False, **OPTIONS
    )
    patterns = [json.loads((d / "rank_pattern.json").read_text()) for d in (out, tmp_path / "single")]
    assert patterns[0] == patterns[1]
    fsdp, one = load_adapter(out / "adapter"), load_adapter(tmp_path / "single" / "adapter")
    assert fsdp.rank_pattern == one.rank_pattern == single.ranks
    worst = 0.0
    for path, module in one.modules.items():
        for name in ("A", "E", "B"):
            mine, ref = getattr(fsdp.modules[path], name), getattr(module, name)
            assert mine.shape == ref.shape
            if ref.numel():
                worst = max(worst, float((mine - ref).abs().max() / ref.abs().max().clamp(min=1e-12)))
    assert worst < 1e-4, worst
    records = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (out, tmp_path / "single")
    ]
    for key in ("loss", "eval_loss"):  # the uneven validation shards (3 and 2 examples) count each example once
        values = [torch.tensor([r[key] for r in rs if key in r]) for rs in records]
        torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=0)


def test_fsdp_resume_after_the_final_shrink_is_byte_identical(tmp_path, fsdp_run):
    out, _, _ = fsdp_run
    stopped = tmp_path / "run"
    stopped.mkdir()
    shutil.copy(out / "run_args.json", stopped)
    shutil.copytree(out / "checkpoint-8", stopped / "checkpoint-8")  # the shrink was at step 7
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("\n".join(metrics[:10]) + "\n")  # step 0 .. 9: records past the checkpoint
    proc = torchrun("--output", stopped, "--resume")
    assert "resumed at step 8: trained steps 9-10" in proc.stdout
    for name in ("adapter", "final"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted(p.name for p in (stopped / name).iterdir())
        for file in files:
            assert (stopped / name / file).read_bytes() == (out / name / file).read_bytes(), f"{name}/{file}"
    strip = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (out, stopped)
    ]
    assert strip[0] == strip[1]


def test_fsdp_needs_torchrun(tmp_path, capsys, llama_base, fsdp_run):
    _, data, _ = fsdp_run
    assert run_cli("train", "--model", llama_base, "--data", data, "--output", tmp_path / "run", "--fsdp") == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the base over torchrun's ranks" in err and "torchrun --nproc_per_node" in err
    assert not (tmp_path / "run").exists()


def test_fsdp_classifier_head_stays_whole(tmp_path, bert_base):
    """A fresh head is trained in full: whole on every rank like the adapters. BERT's dropout draws differ
    between two ranks and one process, so the reference here is DDP on the same two ranks."""
    rng = torch.Generator().manual_seed(3)
    records = [
        {"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=rng)), "label": int(k)}
        for k in torch.randint(0, 2, (24,), generator=rng)
    ]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = {**OPTIONS, "max_steps": 6, "save_steps": 0, "adalora_tfinal": 2}
    flags = ["--model", bert_base, "--data", data, "--batch_size", 2, *[f"--{k}={v}" for k, v in options.items()]]
    torchrun(*flags, "--output", tmp_path / "fsdp", "--fsdp")
    torchrun(*flags, "--output", tmp_path / "ddp")
    fsdp, ddp = load_adapter(tmp_path / "fsdp" / "adapter"), load_adapter(tmp_path / "ddp" / "adapter")
    assert fsdp.rank_pattern == ddp.rank_pattern
    assert sorted(fsdp.extra_weights) == sorted(ddp.extra_weights)
    assert {"classifier.weight", "classifier.bias"} <= set(ddp.extra_weights)
    for name, weight in ddp.extra_weights.items():
        torch.testing.assert_close(fsdp.extra_weights[name], weight, atol=0, rtol=1e-6)
    for path, module in ddp.modules.items():
        for name in ("A", "E", "B"):
            torch.testing.assert_close(getattr(fsdp.modules[path], name), getattr(module, name), atol=0, rtol=1e-6)


def test_trainer_route_refuses_fsdp():
    from adalora_export import AdaLoraConfig
    from adalora_export.errors import UserError
    from adalora_export.training.hf_trainer import AdaLoraCallback

    class Args:
        fsdp, world_size = ["full_shard"], 2

    with pytest.raises(UserError, match="use `torchrun --nproc_per_node N cli.py train ... --fsdp`"):
        AdaLoraCallback(AdaLoraConfig()).on_train_begin(Args(), None, None)


def test_fsdp_killed_after_the_final_shrink_resumes_byte_identical(tmp_path, llama_base, fsdp_run):
    """Both ranks SIGKILLed once the checkpoint after the shrink is on disk, then --resume: the same bytes as
    the uninterrupted run. A kill that lands after the run finished tests nothing, so it is tried again."""
    import signal
    import time

    out, data, val = fsdp_run
    flags = ["--model", llama_base, "--data", data, "--validation", val, "--batch_size", 2, "--fsdp"]
    flags += [f"--{k}={v}" for k, v in OPTIONS.items()]
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        argv = [*TORCHRUN, *map(str, flags), "--output", str(run)]
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 240
        while not (run / "checkpoint-8").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.wait()
        if (run / "checkpoint-8").is_dir() and not (run / "adapter").exists():
            break
    else:
        pytest.fail("no kill landed between checkpoint-8 and the end of the run in 3 tries")
    torchrun("--output", run, "--resume")
    for name in ("adapter", "final"):
        for file in sorted(p.name for p in (out / name).iterdir()):
            assert (run / name / file).read_bytes() == (out / name / file).read_bytes(), f"{name}/{file}"

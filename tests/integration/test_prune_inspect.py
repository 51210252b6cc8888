"""`prune` (runs, checkpoints, PEFT dirs -> compact adapter) and `inspect` (table, JSON, heat map)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli_runs import ROOT, run_cli
from models import LLAMA_TARGETS, tiny_llama
from training import train_adalora

from adalora_export import AdaLoraConfig, inject_adapters
from adalora_export.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adalora_export.formats.state import read_state_dir
from adalora_export.prune import prune
from adalora_export.report import format_table, rank_grid
from adalora_export.sources import load_adapter
from adalora_export.training.checkpoint import save_adapter_state

TOTAL = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run as the trainer leaves it: checkpoint-5 (budget phase), checkpoint-10 (final phase), final/."""
    run = tmp_path_factory.mktemp("run")
    cfg = AdaLoraConfig(
        init_r=4, target_r=1, tinit=2, tfinal=4, lora_alpha=8, target_modules=LLAMA_TARGETS, total_step=TOTAL
    )
    kept = {}
    model = tiny_llama(seed=0)

    def checkpoint(step, allocation, allocator, optimizer):
        name = {5: "checkpoint-5", 10: "checkpoint-10", TOTAL: "final"}.get(step)
        if name:
            (run / name).mkdir()
            save_adapter_state(model, cfg, allocator, step, run / name)
            kept[name] = allocator.kept()

    inject_adapters(model, cfg)
    train_adalora(model, cfg, on_step=checkpoint)
    return run, kept


def test_prune_checkpoint_keeps_exactly_the_mask_in_force(run_dir, tmp_path):
    run, kept = run_dir
    state = read_state_dir(run / "checkpoint-5")
    assert state.frozen_mask is None and state.current_mask is not None  # mid budget phase, layers at init_r
    adapter = prune(run / "checkpoint-5", tmp_path / "a")
    assert sum(adapter.rank_pattern.values()) == kept["checkpoint-5"] < 4 * 14
    for path, keep in state.current_mask.items():
        m = adapter.modules[path]
        idx = torch.tensor(keep)
        a, e, b = (state.tensors[f"{path}.{p}"] for p in ("lora_A", "lora_E", "lora_B"))
        assert m.rank == sum(keep)
        assert torch.equal(m.A, a[idx]) and torch.equal(m.E, e[idx]) and torch.equal(m.B, b[:, idx])
        assert not e[~idx].any()  # what was dropped was masked (E = 0): the function is unchanged
    assert load_adapter(tmp_path / "a").rank_pattern == adapter.rank_pattern


def test_prune_run_takes_final_state_else_latest_checkpoint(run_dir, tmp_path):
    run, _ = run_dir
    final = prune(run, tmp_path / "from_run")
    assert final.rank_pattern == load_adapter(run / "final").rank_pattern
    assert sum(final.rank_pattern.values()) == 14  # target_r x matrices
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("checkpoint-5", "checkpoint-10"):
        (partial / name).symlink_to(run / name)
    latest = prune(partial, tmp_path / "from_partial")  # checkpoint-10, not the string-wise last checkpoint-5
    expected = load_adapter(run / "checkpoint-10")
    for path, m in expected.modules.items():
        assert torch.equal(latest.modules[path].A, m.A)


def test_cli_prune_and_inspect(run_dir, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "adapter"
    assert run_cli("prune", str(run), "--output", str(out)) == 0
    assert "total rank 14" in capsys.readouterr().out
    assert (out / ADAPTER_CONFIG).is_file() and (out / ADAPTER_WEIGHTS).is_file()
    adapter = load_adapter(out)

    assert run_cli("inspect", str(out)) == 0
    table = capsys.readouterr().out
    for path, rank in adapter.rank_pattern.items():
        assert any(line.split()[:2] == [path, str(rank)] for line in table.splitlines()), path
    assert "total rank 14 against budget 14 (target_r 1 x 14); init_r 4 x 14 = 56" in table
    assert table.strip() == format_table(adapter)

    assert run_cli("inspect", str(out), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["module"] for m in data["modules"]] == list(adapter.modules)
    assert data["total_rank"] == 14 and data["initial_budget"] == 56
    assert data["total_parameters"] == sum(m["parameters"] for m in data["modules"]) == adapter.num_parameters()
    assert abs(sum(m["share"] for m in data["modules"]) - 1.0) < 1e-9

    png = tmp_path / "ranks.png"
    assert run_cli("inspect", str(out), "--plot", str(png)) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert width > 400 and height > 300
    labels, types, grid = rank_grid(adapter)
    assert labels == ["0", "1"]
    assert types == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # model order
    assert grid[(1, 6)] == adapter.rank_pattern["model.layers.1.mlp.down_proj"]
    # An existing plot needs --overwrite; with it the file is replaced.
    assert run_cli("inspect", str(out), "--plot", str(png)) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli("inspect", str(out), "--plot", str(png), "--overwrite") == 0


def bad_sources(tmp_path, good):
    """(name, source dir, substrings of the expected message) for each kind of bad input."""
    tmp_path.mkdir()
    cases = []

    def copy_of(name):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    cases.append(("missing", tmp_path / "nope", ["nope does not exist"]))
    (tmp_path / "empty").mkdir()
    cases.append(("empty", tmp_path / "empty", ["empty holds no adapter"]))
    d = copy_of("lora")
    config = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "LORA"}))
    cases.append(("peft_type", d, [ADAPTER_CONFIG, "'LORA' is not ADALORA"]))
    d = copy_of("truncated")
    (d / ADAPTER_WEIGHTS).write_bytes((d / ADAPTER_WEIGHTS).read_bytes()[:500])
    cases.append(("truncated", d, [ADAPTER_WEIGHTS, "not a valid safetensors"]))
    d = copy_of("pickle")
    from safetensors.torch import load_file

    torch.save(load_file(str(d / ADAPTER_WEIGHTS)), str(d / "adapter_model.bin"))
    (d / ADAPTER_WEIGHTS).unlink()
    cases.append(("pickle", d, ["adapter_model.bin", "--allow-pickle"]))
    d = copy_of("json")
    (d / ADAPTER_CONFIG).write_text("{not json")
    cases.append(("json", d, [ADAPTER_CONFIG, "not valid JSON"]))
    return cases


def test_cli_bad_input_exit_2_one_line_nothing_written(run_dir, tmp_path, capsys):
    run, _ = run_dir
    good = tmp_path / "good"
    prune(run, good)
    for name, source, expected in bad_sources(tmp_path / "bad", good):
        out = tmp_path / f"out-{name}"
        assert run_cli("prune", str(source), "--output", str(out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert all(text in err for text in expected), (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*")), name
    # The pickle is readable when allowed.
    assert run_cli("prune", str(tmp_path / "bad" / "pickle"), "--output", str(tmp_path / "ok"), "--allow-pickle") == 0
    # An existing output is left alone without --overwrite.
    before = (good / ADAPTER_WEIGHTS).read_bytes()
    assert run_cli("prune", str(run / "checkpoint-5"), "--output", str(good)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (good / ADAPTER_WEIGHTS).read_bytes() == before
    assert run_cli("prune", str(run / "checkpoint-5"), "--output", str(good), "--overwrite") == 0
    assert sum(load_adapter(good).rank_pattern.values()) > 14


def test_cli_subprocess_exit_code_and_single_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "prune", str(tmp_path / "src"), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'IA3' is not ADALORA" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_sets_the_adapter_beside_lora_at_each_uniform_rank():
    import torch

    from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter
    from adalora_export.report import format_table

    def module(rank):  # 8 x 4 matrix
        return ModuleAdapter(torch.ones(rank, 4), torch.ones(rank, 1), torch.ones(8, rank))

    adapter = CompactAdapter(AdaLoraConfig(init_r=4, target_r=2), {"a.q": module(2), "a.v": module(2)})
    assert adapter.num_parameters() == 2 * 2 * (4 + 8 + 1)  # 52: between LoRA r=2 (48) and r=4 (96)
    line = format_table(adapter).splitlines()[-1]
    assert line.startswith("LoRA on the same matrices: r=1 24, r=2 48, r=4 96, r=8 192")
    assert line.endswith("this adapter is between LoRA r=2 and r=4")

"""The compact adapter format (docs/design.md): PEFT loads ours, we read PEFT's, and bad files are refused cleanly."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from training import train_adalora, train_peft

from adalora_export import AdaLoraConfig, CompactAdapter, UserError, adapted_layers, inject_adapters
from adalora_export.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, PREFIX, save_adapter
from adalora_export.sources import load_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_run():
    """A tiny Llama trained with our core through the final phase; lm_head fully trained as an extra weight."""
    model = tiny_llama(seed=0)
    cfg = AdaLoraConfig(
        init_r=4, target_r=1, tinit=2, tfinal=2, lora_alpha=8, target_modules=LLAMA_TARGETS, total_step=12
    )
    inject_adapters(model, cfg, trainable=["lm_head"])
    train_adalora(model, cfg)
    adapter = CompactAdapter.from_model(model, cfg, task_type="causal_lm")
    ranks = list(adapter.rank_pattern.values())
    assert 0 in ranks and len(set(ranks)) >= 3, ranks  # heterogeneous, some modules at rank 0
    return model, adapter


@pytest.fixture(scope="module")
def gpt2_run():
    model = tiny_gpt2(seed=0)
    cfg = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, lora_alpha=8, target_modules=GPT2_TARGETS, total_step=8
    )
    inject_adapters(model, cfg)
    train_adalora(model, cfg)
    return model, CompactAdapter.from_model(model, cfg, task_type="causal_lm")


def ids(seed=5):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def load_with_peft(base, adapter_dir):
    """PeftModel.from_pretrained, asserting that no adapter key was missing or unexpected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    # Loading the same directory as a second adapter returns PEFT's own load result.
    result = model.load_adapter(str(adapter_dir), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.set_adapter("default")
    return model.eval()


@pytest.mark.parametrize("run", ["llama_run", "gpt2_run"])
def test_peft_loads_our_adapter_with_same_outputs(run, request, tmp_path):
    model, adapter = request.getfixturevalue(run)
    out = tmp_path / "adapter"
    save_adapter(adapter, out)
    base = tiny_llama(seed=0) if run == "llama_run" else tiny_gpt2(seed=0)
    theirs = load_with_peft(base, out)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "ADALORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is (run == "gpt2_run")
    for path, module in adapter.modules.items():
        layer = theirs.base_model.model.get_submodule(path)
        assert layer.lora_E["default"].shape[0] == module.rank, path
        assert sum(config["rank_pattern"][f"{path}.lora_E"]) == module.rank
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        assert (theirs(input_ids=x).logits - expected).abs().max().item() <= 1e-5
        # Merging exercises the delta's layout (Conv1D stores in x out) and lm_head came as modules_to_save.
        merged = theirs.merge_and_unload()
        assert (merged(input_ids=x).logits - expected).abs().max().item() <= 1e-5


def test_compact_bytes_are_exactly_the_kept_triplets(llama_run, tmp_path):
    _, adapter = llama_run
    save_adapter(adapter, tmp_path / "a")
    lora_bytes, itemsize = 0, 4
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as fh:
        for key in fh.keys():
            if key.rpartition(".")[2] in ("lora_A", "lora_E", "lora_B"):
                t = fh.get_tensor(key)
                assert t.element_size() == itemsize
                lora_bytes += t.numel() * t.element_size()
    expected = sum(m.rank * (m.in_features + m.out_features + 1) * itemsize for m in adapter.modules.values())
    assert lora_bytes == expected
    zero = [p for p, m in adapter.modules.items() if m.rank == 0]
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as fh:
        assert fh.get_slice(f"{PREFIX}{zero[0]}.lora_A").get_shape() == [0, 64]


def test_round_trip_keeps_everything(llama_run, tmp_path):
    _, adapter = llama_run
    first = next(iter(adapter.modules.values()))
    first.importance = torch.arange(first.rank, dtype=torch.float32)
    try:
        save_adapter(adapter, tmp_path / "a")
    finally:
        first.importance = None
    back = load_adapter(tmp_path / "a")
    assert back.config == adapter.config and back.task_type == "causal_lm"
    assert list(back.rank_pattern.items()) == list(adapter.rank_pattern.items())  # model order kept
    for path, m in adapter.modules.items():
        for part in ("A", "E", "B"):
            assert torch.equal(getattr(back.modules[path], part), getattr(m, part))
    assert torch.equal(next(iter(back.modules.values())).importance, torch.arange(first.rank, dtype=torch.float32))
    assert back.extra_weights.keys() == {"lm_head.weight"}
    assert torch.equal(back.extra_weights["lm_head.weight"], adapter.extra_weights["lm_head.weight"])
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["total_rank"] == sum(adapter.rank_pattern.values()) == manifest["budget"]
    with pytest.raises(UserError, match="already exists"):
        save_adapter(adapter, tmp_path / "a")


@pytest.fixture(scope="module")
def peft_trained():
    """A tiny Llama trained by PEFT's own AdaLoRA through the final phase (update_and_allocate each step)."""
    cfg = peft.AdaLoraConfig(
        init_r=4,
        target_r=1,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=8,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        task_type="CAUSAL_LM",
        modules_to_save=["lm_head"],
    )
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(8)]
    model = train_peft(tiny_llama(seed=0), cfg, batches, lr=2e-2)
    assert model.peft_config["default"].rank_pattern is not None
    return model.eval()


def peft_deltas(model):
    return {
        path: layer.get_delta_weight("default").detach()
        for path, layer in model.base_model.model.named_modules()
        if hasattr(layer, "lora_E") and "default" in getattr(layer, "lora_E", {})
    }


@pytest.mark.parametrize("sliced", [True, False])
def test_reads_adapters_peft_saved(peft_trained, sliced, tmp_path):
    model = copy.deepcopy(peft_trained)
    if not sliced:  # PEFT saves at init_r, zeros in E, when no rank pattern is set
        model.peft_config["default"].rank_pattern = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the empty tensors of rank-0 modules
        model.save_pretrained(str(tmp_path / "p"))
    stored = load_file(str(tmp_path / "p" / ADAPTER_WEIGHTS))
    assert (stored[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_E"].shape[0] == 4) is not sliced
    adapter = load_adapter(tmp_path / "p")
    expected = peft_deltas(peft_trained)
    assert expected.keys() == adapter.modules.keys()
    assert any(m.rank == 0 for m in adapter.modules.values())
    pattern = {k.replace(".default", ""): v for k, v in peft_trained.peft_config["default"].rank_pattern.items()}
    for path, delta in expected.items():
        assert adapter.modules[path].rank == sum(pattern[f"{path}.lora_E"]), path
        assert (adapter.delta_weight(path) - delta).abs().max().item() <= 1e-6, path
    assert torch.equal(
        adapter.extra_weights["lm_head.weight"],
        peft_trained.base_model.model.lm_head.modules_to_save["default"].weight,
    )
    # And it goes back out in our format, loadable by PEFT, with the same outputs.
    save_adapter(adapter, tmp_path / "ours")
    reloaded = load_with_peft(tiny_llama(seed=0), tmp_path / "ours")
    x = ids()
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - peft_trained(input_ids=x).logits).abs().max().item() <= 1e-5


def test_state_dir_reads_like_the_model(llama_run, tmp_path):
    from adalora_export.training.checkpoint import save_adapter_state

    model, adapter = llama_run
    (tmp_path / "state").mkdir()
    save_adapter_state(model, adapter.config, None, 12, tmp_path / "state")
    back = load_adapter(tmp_path / "state")
    assert back.rank_pattern == adapter.rank_pattern
    for path, _ in adapted_layers(model):
        assert torch.equal(back.delta_weight(path), adapter.delta_weight(path))


# ------------------------------------------------------------------------------------------ bad input
def _corrupt(kind, d):
    weights, config_path = d / ADAPTER_WEIGHTS, d / ADAPTER_CONFIG
    tensors, config = load_file(str(weights)), json.loads(config_path.read_text())
    module = next(k for k, v in config["rank_pattern"].items() if 2 <= sum(v) < len(v))[: -len(".lora_E")]
    key = f"{PREFIX}{module}"
    if kind == "peft_type":
        config["peft_type"] = "LORA"
    elif kind == "missing":
        del tensors[f"{key}.lora_B"]
    elif kind == "pattern":
        config["rank_pattern"][f"{module}.lora_E"] = [True] * 1 + [False] * 3
    elif kind == "shapes":
        tensors[f"{key}.lora_E"] = tensors[f"{key}.lora_E"][:1]
        tensors[f"{key}.lora_A"] = tensors[f"{key}.lora_A"][:1]
        config["rank_pattern"][f"{module}.lora_E"] = [True] + [False] * 3
    elif kind in ("nan", "inf"):
        tensors[f"{key}.lora_B"][0, 0] = float(kind)
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif kind == "pickle":
        weights.unlink()
        torch.save(tensors, str(d / "adapter_model.bin"))
    else:
        save_file(tensors, str(weights))
    config_path.write_text(json.dumps(config))
    return module


BAD = {
    "peft_type": "LORA",
    "missing": "lora_B",
    "pattern": "rank_pattern",
    "shapes": "inconsistent ranks",
    "nan": "NaN",
    "inf": "Inf",
    "truncated": "not a valid safetensors",
    "garbage": "not a valid safetensors",
    "pickle": "--allow-pickle",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_adapter_exits_2_naming_the_problem_and_writes_nothing(kind, llama_run, tmp_path, capsys):
    from adalora_export.cli import main

    _, adapter = llama_run
    d, out = tmp_path / "bad", tmp_path / "out"
    save_adapter(adapter, d)
    module = _corrupt(kind, d)
    with pytest.raises(UserError, match=BAD[kind]):
        load_adapter(d)
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(d), "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and BAD[kind] in err
    if kind in ("missing", "pattern", "shapes", "nan", "inf"):
        assert module in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]
    if kind == "pickle":  # allowed explicitly, it reads (weights_only) to the same adapter
        back = load_adapter(d, allow_pickle=True)
        assert back.rank_pattern == adapter.rank_pattern

"""LoRA export in both layouts: PEFT and transformers load them exactly, and each serving runtime's
reading rule (the config keys it reads, its scale, padding, stacking, missing modules) gives our update."""

from __future__ import annotations

import json
import re

import pytest
import torch
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from training import train_adalora

from adalora_export import AdaLoraConfig, CompactAdapter, UserError, inject_adapters
from adalora_export.converters.lora import LORA_LAYOUTS, export_lora
from adalora_export.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, save_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request):
    if request.param == "llama":
        model, targets, extra = tiny_llama(seed=0), LLAMA_TARGETS, ["lm_head"]
    else:
        model, targets, extra = tiny_gpt2(seed=0), GPT2_TARGETS, None
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=2, lora_alpha=8, target_modules=targets, total_step=10)
    inject_adapters(model, cfg, trainable=extra)
    train_adalora(model, cfg)
    adapter = CompactAdapter.from_model(model, cfg, task_type="causal_lm")
    assert any(m.rank == 0 for m in adapter.modules.values())
    return request.param, model, adapter


def export_both(adapter, tmp_path) -> dict:
    """Each layout through the CLI, as a user writes it."""
    from adalora_export.cli import main

    save_adapter(adapter, tmp_path / "adalora")
    for layout in LORA_LAYOUTS:
        out = tmp_path / layout
        main(["export", str(tmp_path / "adalora"), "--to", "lora", "--lora-layout", layout, "--output", str(out)])
    return {layout: tmp_path / layout for layout in LORA_LAYOUTS}


def read_lora(directory):
    """(config, {module path: (lora_A, lora_B)}) as they are stored."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    modules = {}
    for key, value in tensors.items():
        match = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if match:
            modules.setdefault(match.group(1), {})[match.group(2)] = value
    return config, {path: (ab["A"], ab["B"]) for path, ab in modules.items()}


def ours(adapter) -> dict:
    """Our update per module (out x in), rank-0 modules as zeros."""
    return {path: m.delta(adapter.scale) for path, m in adapter.modules.items()}


def assert_updates_equal(adapter, got: dict):
    """``got`` (module -> update, absent = no update) equals ours for every adapted module."""
    for path, expected in ours(adapter).items():
        update = got.get(path, torch.zeros_like(expected))
        assert (update - expected).abs().max().item() <= 1e-6, path


def updates_differ(adapter, got: dict) -> bool:
    return any(
        (got.get(path, torch.zeros_like(expected)) - expected).abs().max().item() > 1e-6
        for path, expected in ours(adapter).items()
    )


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
def test_peft_and_transformers_load_each_layout_with_our_outputs(trained, layout, tmp_path):
    name, model, adapter = trained
    directory = export_both(adapter, tmp_path)[layout]
    config, modules = read_lora(directory)
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    if layout == "compact":
        assert (
            config["rank_pattern"]
            == config["alpha_pattern"]
            == {p: m.rank for p, m in adapter.modules.items() if m.rank}
        )
        assert all(a.shape[0] == adapter.modules[p].rank for p, (a, _) in modules.items())
    else:
        assert "rank_pattern" not in config and "alpha_pattern" not in config
        assert set(modules) == set(adapter.modules) and {a.shape[0] for a, _ in modules.values()} == {config["r"]}
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=x).logits
        base = tiny_llama(seed=0) if name == "llama" else tiny_gpt2(seed=0)
        lora = peft.PeftModel.from_pretrained(base, str(directory)).eval()
        assert (lora(input_ids=x).logits - expected).abs().max().item() <= 1e-5
        merged = lora.merge_and_unload()  # merging uses the layout of the update (Conv1D: in x out)
        assert (merged(input_ids=x).logits - expected).abs().max().item() <= 1e-5
        hf = tiny_llama(seed=0) if name == "llama" else tiny_gpt2(seed=0)
        hf.load_adapter(str(directory))  # transformers' own PEFT integration
        assert (hf.eval()(input_ids=x).logits - expected).abs().max().item() <= 1e-5


def vllm_rule(directory, max_lora_rank: int = 16) -> dict:
    """vLLM: only ``r`` and ``lora_alpha`` count (PEFTHelper drops other keys), one scale alpha / r for
    every module, each module's tensors zero-padded into ``max_lora_rank`` slots."""
    config, modules = read_lora(directory)
    assert config["r"] <= max_lora_rank, "vLLM refuses an adapter above --max-lora-rank"
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for path, (a, b) in modules.items():
        slots_a = torch.zeros(max_lora_rank, a.shape[1])
        slots_b = torch.zeros(b.shape[0], max_lora_rank)
        slots_a[: a.shape[0]], slots_b[:, : b.shape[1]] = a, b
        out[path] = slots_b @ slots_a * scale
    return out


def sglang_rule(directory) -> dict:
    """SGLang: refuses an adapter whose rank_pattern or alpha_pattern changes a module's rank or alpha."""
    config, modules = read_lora(directory)
    for key, default in (("rank_pattern", config["r"]), ("alpha_pattern", config["lora_alpha"])):
        if any(value != default for value in (config.get(key) or {}).values()):
            raise ValueError(f"SGLang refuses {key}")
    return {path: b @ a * (config["lora_alpha"] / config["r"]) for path, (a, b) in modules.items()}


def tgi_rule(directory, adapted: list[str]) -> dict:
    """TGI / LoRAX: ``r`` and ``lora_alpha`` only; each module type is stacked across layers at one
    rank, and a type that any layer lacks is dropped from every layer."""
    config, modules = read_lora(directory)
    scale = config["lora_alpha"] / config["r"]
    kind = {path: re.sub(r"\.\d+\.", ".#.", path) for path in adapted}
    out = {}
    for t in set(kind.values()):
        layers = [p for p in adapted if kind[p] == t]
        if not all(p in modules for p in layers):
            continue  # dropped everywhere
        if len({modules[p][0].shape[0] for p in layers}) != 1:
            raise ValueError(f"TGI cannot stack {t}: ranks differ across layers")
        out.update({p: modules[p][1] @ modules[p][0] * scale for p in layers})
    return out


def llama_cpp_rule(directory) -> dict:
    """llama.cpp (convert_lora_to_gguf.py and its runtime): one global alpha over each tensor's own rank;
    alpha 0 means scale 1."""
    config, modules = read_lora(directory)
    alpha = config["lora_alpha"]
    return {path: b @ a * (alpha / a.shape[0] if alpha else 1.0) for path, (a, b) in modules.items()}


def test_vllm_rule_gives_our_update_in_both_layouts(trained, tmp_path):
    _, _, adapter = trained
    for directory in export_both(adapter, tmp_path).values():
        assert_updates_equal(adapter, vllm_rule(directory, max_lora_rank=16))


def test_sglang_rule_takes_the_uniform_layout_and_refuses_the_compact_one(trained, tmp_path):
    _, _, adapter = trained
    dirs = export_both(adapter, tmp_path)
    assert_updates_equal(adapter, sglang_rule(dirs["uniform"]))
    assert len({m.rank for m in adapter.modules.values() if m.rank}) > 1  # heterogeneous ranks
    with pytest.raises(ValueError, match="SGLang refuses"):
        sglang_rule(dirs["compact"])


def test_tgi_lorax_rule_needs_the_uniform_layout(trained, tmp_path):
    _, _, adapter = trained
    dirs = export_both(adapter, tmp_path)
    assert_updates_equal(adapter, tgi_rule(dirs["uniform"], list(adapter.modules)))
    # compact: rank-0 modules are left out (their type is dropped everywhere) or ranks differ per layer
    try:
        assert updates_differ(adapter, tgi_rule(dirs["compact"], list(adapter.modules)))
    except ValueError as exc:
        assert "ranks differ" in str(exc)


def test_llama_cpp_rule_needs_the_uniform_layout(trained, tmp_path):
    _, _, adapter = trained
    dirs = export_both(adapter, tmp_path)
    assert_updates_equal(adapter, llama_cpp_rule(dirs["uniform"]))
    assert updates_differ(adapter, llama_cpp_rule(dirs["compact"]))  # alpha = R over a smaller rank


def test_uniform_layout_costs_padding_on_disk(trained, tmp_path):
    _, _, adapter = trained
    dirs = export_both(adapter, tmp_path)
    sizes = {layout: (d / ADAPTER_WEIGHTS).stat().st_size for layout, d in dirs.items()}
    top = max(m.rank for m in adapter.modules.values())
    padded = sum(top * (m.in_features + m.out_features) for m in adapter.modules.values())
    compact = sum(m.rank * (m.in_features + m.out_features) for m in adapter.modules.values())
    extra = sum(t.numel() for t in adapter.extra_weights.values())
    assert sizes["uniform"] - sizes["compact"] >= 4 * (padded - compact) > 0
    assert sizes["compact"] >= 4 * (compact + extra)


def test_export_refuses_all_zero_adapter_an_existing_output_and_foreign_flags(trained, tmp_path, capsys):
    _, _, adapter = trained
    empty = CompactAdapter(
        config=adapter.config,
        modules={p: type(m)(m.A[:0], m.E[:0], m.B[:, :0]) for p, m in adapter.modules.items()},
    )
    with pytest.raises(UserError, match="rank 0"):
        export_lora(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_lora(adapter, tmp_path / "out")
    with pytest.raises(UserError, match="already exists"):
        export_lora(adapter, tmp_path / "out")
    with pytest.raises(UserError, match="unknown LoRA layout"):
        export_lora(adapter, tmp_path / "other", layout="padded")
    from adalora_export.cli import main

    save_adapter(adapter, tmp_path / "adalora")
    for flag in (["--dtype", "fp16"], ["--workers", "2"], ["--base", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tmp_path / "adalora"), "--to", "lora", *flag, "--output", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert f"{flag[0]} does not apply to --to lora" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                str(tmp_path / "adalora"),
                "--merge",
                "--lora-layout",
                "uniform",
                "--output",
                str(tmp_path / "x"),
            ]
        )
    assert "--lora-layout does not apply to --merge" in capsys.readouterr().err

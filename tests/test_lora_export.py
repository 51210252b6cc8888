"""LoRA export (SPEC §3): PEFT's LoRA computes the AdaLoRA adapter's outputs; rank-0 modules are left out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support import LLAMA_TARGETS, tiny_gpt2, tiny_llama, train_adalora

from adalora_export import AdaLoraConfig, CompactAdapter, UserError
from adalora_export.converters.lora import export_lora
from adalora_export.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, save_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request):
    if request.param == "llama":
        model, targets, extra = tiny_llama(seed=0), LLAMA_TARGETS, ["lm_head"]
    else:
        model, targets, extra = tiny_gpt2(seed=0), ["c_attn", "c_proj", "c_fc"], None
    cfg = AdaLoraConfig(init_r=4, target_r=1, tinit=2, tfinal=2, lora_alpha=8, target_modules=targets, total_step=10)
    train_adalora(model, cfg, trainable=extra)
    adapter = CompactAdapter.from_model(model, cfg, task_type="causal_lm")
    assert any(m.rank == 0 for m in adapter.modules.values())
    return request.param, model, adapter


def test_peft_lora_gives_the_adalora_outputs(trained, tmp_path, capsys):
    name, model, adapter = trained
    save_adapter(adapter, tmp_path / "adalora")
    from adalora_export.cli import main

    main(["export", str(tmp_path / "adalora"), "--to", "lora", "--output", str(tmp_path / "lora")])
    config = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(tmp_path / "lora" / ADAPTER_WEIGHTS))
    kept = {p: m for p, m in adapter.modules.items() if m.rank > 0}
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(kept)
    assert config["rank_pattern"] == {p: m.rank for p, m in kept.items()}
    for path, m in kept.items():
        assert config["alpha_pattern"][path] / m.rank == pytest.approx(adapter.scale, rel=1e-12)
        assert torch.equal(tensors[f"{PREFIX}{path}.lora_A.weight"], m.A * m.E)
    assert not any(p in key for p in adapter.modules.keys() - kept.keys() for key in tensors)  # rank 0: left out

    base = tiny_llama(seed=0) if name == "llama" else tiny_gpt2(seed=0)
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    result = lora.load_adapter(str(tmp_path / "lora"), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    lora.set_adapter("default")
    for path, m in kept.items():
        assert lora.base_model.model.get_submodule(path).r["default"] == m.rank
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=x).logits
        assert (lora(input_ids=x).logits - expected).abs().max().item() <= 1e-5
        merged = lora.merge_and_unload()  # merging uses the layout of the update (Conv1D: in x out)
        assert (merged(input_ids=x).logits - expected).abs().max().item() <= 1e-5


def test_export_refuses_all_zero_adapter_and_existing_output(trained, tmp_path):
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

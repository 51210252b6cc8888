"""`train`: outputs, determinism, exact resume (also past the final shrink), gradient accumulation, bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from files import copy_tree
from models import WORDS
from safetensors.torch import load_file, save_file
from training import sentences, write_data

from adalora_export import cli
from adalora_export.errors import UserError
from adalora_export.formats.state import list_checkpoints, read_state_dir
from adalora_export.sources import load_adapter
from adalora_export.training import train
from adalora_export.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def run(short_schedule):
    """``run(out, model, data, **options)``: ``train()`` on the short schedule (12 optimizer steps, budget phase
    3..8, final shrink at step 8) with the paper's algorithm (budgets in triplets), ``options`` on top. The
    default preset has tests of its own below."""

    def run(out, model, data, **options):
        options = {**short_schedule, "adalora_preset": "paper", **options}
        return train(out, model=model, data=data, progress=False, **options)

    return run


def metrics_without_times(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run, llama_base, train_data):
    """One uninterrupted run that several tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run(out, llama_base, train_data, validation=train_data)
    return out, result


def test_run_outputs(reference, llama_base):
    out, result = reference
    assert {"adapter", "final", "rank_pattern.json", "rank_heatmap.png", "metrics.jsonl", "run_args.json"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # one record per optimizer step
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the evaluation before training
    assert "eval_loss" in steps[-1]
    assert [r["budget"] for r in steps][:2] == [4 * 14] * 2 and steps[-1]["budget"] == 2 * 14
    assert all(r["final"] for r in steps[7:]) and not steps[6]["final"]
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in range(2, 13, 2)]
    adapter = load_adapter(out / "adapter")
    # the end of train reports the final size next to LoRA at each uniform rank on the same matrices
    fan = sum(m.in_features + m.out_features for m in adapter.modules.values())
    assert (
        f"adapter: {adapter.num_parameters():,} parameters. LoRA on the same matrices: r=1 {fan:,}" in result.summary()
    )
    assert sum(adapter.rank_pattern.values()) == 2 * 14 == result.budget
    assert adapter.rank_pattern == result.ranks
    assert adapter.base_model_name_or_path == str(llama_base.absolute()) and adapter.task_type == "causal_lm"
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert pattern["ranks"] == result.ranks and pattern["budget"] == 28
    assert (out / "rank_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert result.loss_start > 0 and result.loss_end > 0


def test_same_seed_same_bytes(tmp_path, reference, llama_base, train_data, run):
    out, _ = reference
    again = tmp_path / "again"
    run(again, llama_base, train_data, validation=train_data)
    assert dir_bytes(again / "adapter") == dir_bytes(out / "adapter")
    assert dir_bytes(again / "final") == dir_bytes(out / "final")
    other = tmp_path / "other"
    run(other, llama_base, train_data, seed=4, max_steps=3, save_steps=0, adalora_tinit=0, adalora_tfinal=1)
    assert (other / "adapter" / "adapter_model.safetensors").read_bytes() != (
        out / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("step", [4, 10], ids=["before-shrink", "past-shrink"])
def test_resume_from_a_checkpoint_ends_identical(tmp_path, reference, step):
    """A run that stopped right after checkpoint-<step> and is resumed ends byte-identical."""
    out, _ = reference
    stopped = tmp_path / "run"
    stopped.mkdir()
    shutil.copy(out / "run_args.json", stopped)
    shutil.copytree(out / f"checkpoint-{step}", stopped / f"checkpoint-{step}")
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text("\n".join(metrics[: step + 3]) + "\n")  # with records past the checkpoint
    state = load_checkpoint(stopped / f"checkpoint-{step}").adapter
    assert (state.frozen_mask is not None) == (step > 8)
    result = train(stopped, resume=True, progress=False)
    # Issue 23: the summary said "trained 12 steps" where this process ran the steps after the checkpoint.
    assert result.summary().startswith(f"resumed at step {step}: trained steps {step + 1}-12 in ")
    assert dir_bytes(stopped / "adapter") == dir_bytes(out / "adapter")
    assert metrics_without_times(stopped) == metrics_without_times(out)


def test_resume_refuses_changed_options(reference, train_data):
    out, _ = reference
    with pytest.raises(UserError, match="cannot resume .* --lr"):
        train(out, resume=True, lr=1.0, progress=False)


def test_grad_accum_matches_one_big_batch(tmp_path, llama_base, train_data, run):
    big = run(tmp_path / "big", llama_base, train_data, batch_size=8, max_steps=10, save_steps=0)
    accum = run(tmp_path / "accum", llama_base, train_data, batch_size=2, grad_accum=4, max_steps=10, save_steps=0)
    assert big.ranks == accum.ranks
    masks = [json.loads((tmp_path / r / "rank_pattern.json").read_text())["frozen_mask"] for r in ("big", "accum")]
    assert masks[0] == masks[1]
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("big", "accum")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (load_adapter(tmp_path / r / "adapter") for r in ("big", "accum"))
    for path in a.modules:
        torch.testing.assert_close(a.delta_weight(path), b.delta_weight(path), atol=1e-5, rtol=1e-4)


def test_gpt2_prompt_completion_run(tmp_path, gpt2_base, run):
    base = gpt2_base
    data = tmp_path / "pc.jsonl"
    pairs = [t.split(" ", 2) for t in sentences(32, 1)]
    data.write_text("".join(json.dumps({"prompt": " ".join(p[:2]), "completion": p[2]}) + "\n" for p in pairs))
    result = run(tmp_path / "run", base, data, max_steps=6, save_steps=0, adalora_tfinal=2, adalora_tinit=1)
    adapter = load_adapter(tmp_path / "run" / "adapter")
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert set(adapter.modules) == {f"transformer.h.{i}.{m}" for i in range(2) for m in names}
    assert all(m.fan_in_fan_out for m in adapter.modules.values())
    assert sum(result.ranks.values()) == result.budget == 16


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_base, run):
    poisoned = copy_tree(tiny_base(words=[*WORDS, "poison"]), tmp_path / "poisoned")
    weights = load_file(poisoned / "model.safetensors")
    vocab = json.loads((poisoned / "tokenizer.json").read_text())["model"]["vocab"]
    weights["model.embed_tokens.weight"][vocab["poison"]] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    texts = sentences(48, 0)
    texts[-1] = "poison " + texts[-1]  # the last example of the file: some step after the first ones
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with pytest.raises(UserError, match=r"training stopped at step (\d+): loss nan.*checkpoint-\d+ is intact") as err:
        run(tmp_path / "run", poisoned, data, save_steps=1)
    bad_step = int(err.value.args[0].split("step ")[1].split(":")[0])
    assert bad_step > 1
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == f"checkpoint-{bad_step - 1}"
    load_checkpoint(tmp_path / "run" / f"checkpoint-{bad_step - 1}")  # complete and readable
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adalora_tinit", "10", "--adalora-tfinal", "2"], "no budget phase"),
        (["--train_type", "qlora"], "Invalid value for '--train_type'"),
        (["--train_type", "lora", "--adalora_target_r", "0"], "train_type lora needs adalora_target_r"),
        (["--adalora_target_r", "20"], "must not exceed adalora_init_r"),
        (["--target_modules", "nothing_here"], "match no nn.Linear"),
        (["--batch_size", "64"], "fewer than one optimizer step"),
        (["--epochs", "1"], "give --epochs or --max_steps, not both"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, llama_base, train_data, flags, message):
    out = tmp_path / "run"
    base = ["train", "--model", str(llama_base), "--data", str(train_data), "--output", str(out), "--max_steps", "12"]
    assert run_cli(*base, *flags) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # progress bars aside
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_existing_output_needs_overwrite_or_resume(tmp_path, capsys, llama_base, train_data):
    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", "--model", str(llama_base), "--data", str(train_data), "--output", str(out), "--max-steps", "2"]
    assert run_cli(*argv) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert run_cli("train", "--output", out, "--resume") == 2
    assert "holds no run" in capsys.readouterr().err
    cli.main(argv + ["--overwrite", "--adalora_init_r", "2", "--adalora_target_r", "1"])
    captured = capsys.readouterr().out
    assert "trained 2 steps" in captured and (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_decoders_chat_and_classification(tmp_path, arch, run):
    """Qwen2 and Mistral: chat records for the causal LM, and a fresh `score` head for classification."""
    import transformers as tf

    from adalora_export.toy import toy_tokenizer

    tokenizer = toy_tokenizer(WORDS + ["user", "assistant", ":"])
    cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}
    config_cls, model_cls = cls[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = tmp_path / arch
    model_cls(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    texts = sentences(16, 2)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}) + "\n"
            for a, b in zip(texts[::2], texts[1::2])
        )
    )
    small = dict(max_steps=3, save_steps=0, adalora_tinit=0, adalora_tfinal=1, batch_size=4)
    lm = run(tmp_path / "lm", base, chat, **small)
    assert sum(lm.ranks.values()) == lm.budget == 2 * 7
    labelled = write_data(tmp_path / "cls.jsonl", n=16, label="x")
    lines = labelled.read_text().splitlines()
    labelled.write_text("\n".join(line.replace('"x"', '"yes"' if i % 2 else '"no"') for i, line in enumerate(lines)))
    run(tmp_path / "cls", base, labelled, **small)
    adapter = load_adapter(tmp_path / "cls" / "adapter")
    assert adapter.task_type == "seq_cls" and set(adapter.extra_weights) == {"score.weight"}
    assert adapter.extra_weights["score.weight"].shape == (2, 32)


PRESET_DECIDES = dict(adalora_tinit=None, adalora_tfinal=None)  # unset: the preset's


def test_recommended_preset_sets_the_schedule_from_the_run_length(tmp_path, llama_base, train_data, run):
    out = tmp_path / "run"
    run(out, llama_base, train_data, max_steps=20, save_steps=0, adalora_preset="recommended", **PRESET_DECIDES)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["tinit"], config["tfinal"], config["total_step"]) == (2, 10, 20)  # 10% and 50% of 20 steps
    records = [r for r in metrics_without_times(out) if "budget" in r]
    frozen = [r["step"] for r in records if r["final"]]
    assert frozen == list(range(10, 21))  # the ranks freeze at total_step - tfinal, and stay frozen
    assert records[0]["budget"] == records[1]["budget"] > records[2]["budget"]  # the budget falls after tinit
    config = read_state_dir(out / "final").config
    assert config.final_orth_reg_weight == 0.0  # no orthogonal term once frozen
    adapter = load_adapter(out / "adapter")
    assert config.budget_unit == "params" and records[-1]["budget"] == sum(  # LoRA's size at target_r
        config.target_r * (m.in_features + m.out_features) for m in adapter.modules.values()
    )
    # Issue 23: "kept" counted parameters until the first mask and triplets after it. Now it is always in
    # the budget's unit (it compares with "budget"), and kept_triplets counts the triplets.
    assert records[0]["kept"] == records[0]["budget"] and records[0]["kept_triplets"] == config.init_r * len(
        adapter.modules
    )
    assert all(r["kept"] <= r["budget"] for r in records if r["masked"] or r["final"])
    assert (
        records[-1]["kept"] == adapter.num_parameters()
        and records[-1]["kept_triplets"] == adapter.summary()["total_rank"]
    )
    # the weight in force: the paper's until the step that freezes the ranks, none after it
    assert {r["orth_weight"] for r in records if r["step"] > frozen[0]} == {0.0}
    assert {r["orth_weight"] for r in records if r["step"] <= frozen[0]} == {0.5}


def test_explicit_flags_win_over_the_preset(tmp_path, llama_base, train_data, run):
    out = tmp_path / "run"
    options = dict(max_steps=20, save_steps=0, adalora_preset="recommended", adalora_budget_unit="triplets")
    run(out, llama_base, train_data, **{**PRESET_DECIDES, "adalora_tinit": 3}, **options)
    config = read_state_dir(out / "final").config
    assert (config.tinit, config.tfinal, config.budget_unit) == (3, 10, "triplets")  # tfinal still the preset's
    assert config.final_orth_reg_weight == 0.0


def test_head_lr_trains_a_fresh_head_at_its_own_rate(tmp_path, bert_base):
    """--head_lr: the head moves at its rate while the adapters keep theirs (here: almost still)."""
    base = bert_base
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(WORDS, k=5)), "label": rng.choice(["a", "b"])} for _ in range(32)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(max_steps=3, batch_size=8, lr=1e-9, warmup_ratio=0.0, save_steps=0, progress=False)
    common.update(adalora_init_r=2, adalora_target_r=2, adalora_tinit=1, adalora_tfinal=1)  # no pruning: same ranks
    with_head = load_adapter(train(tmp_path / "a", base, data, head_lr=1e-2, **common).run_dir / "adapter")
    same = load_adapter(train(tmp_path / "b", base, data, **common).run_dir / "adapter")
    moved = max((with_head.extra_weights[n] - same.extra_weights[n]).abs().max() for n in same.extra_weights)
    assert moved > 1e-4  # the head trained at 1e-2 in one run, 1e-9 in the other
    for path, module in same.modules.items():  # the adapters trained at 1e-9 in both
        torch.testing.assert_close(with_head.modules[path].B, module.B, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="--head_lr must be > 0"):
        train(tmp_path / "c", base, data, head_lr=0.0, **common)


def test_help_says_what_the_final_orthogonal_weight_defaults_to(capsys):
    """Issue 23: the help said "(default: same)" while the default preset sets 0."""
    assert run_cli("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Orthogonal weight once ranks are frozen (default: the preset's: recommended 0" in text


def test_train_type_lora_is_lora_at_target_r(tmp_path, llama_base, train_data, run):
    """--train_type lora: LoRA at target_r in the SVD container. It starts like PEFT's LoRA (B = 0, A
    Kaiming-uniform, E = 1: the model starts as the base), keeps every matrix at target_r (init_r is not
    used, the scale is alpha / r), never masks and has no orthogonal term; the adapter is an adapter."""
    from adalora_export import AdaLoraConfig, adapted_layers, inject_adapters
    from adalora_export.hf import load_base

    config = AdaLoraConfig(train_type="lora", init_r=12, target_r=3, tinit=5, orth_reg_weight=0.5)
    assert (config.init_r, config.tinit, config.orth_reg_weight, config.budget_unit) == (3, 0, 0.0, "triplets")
    model = load_base(llama_base)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
        inject_adapters(model, config)
        torch.testing.assert_close(model(ids).logits, before)  # B = 0: the base, exactly
    for _, layer in adapted_layers(model):
        a, e, b = (p.detach() for p in (layer.lora_A, layer.lora_E, layer.lora_B))
        assert layer.rank == 3 and float(b.abs().max()) == 0.0 and bool((e == 1).all())
        bound = 1 / layer.in_features**0.5  # kaiming_uniform_(a=sqrt(5)) on (r, in), as nn.Linear and PEFT
        assert bound / 2 < float(a.abs().max()) <= bound
    with pytest.raises(UserError, match="train_type lora needs adalora_target_r"):
        AdaLoraConfig(train_type="lora", target_r=0)

    out = tmp_path / "run"
    run(out, llama_base, train_data, train_type="lora", adalora_init_r=12, adalora_target_r=3, save_steps=0)
    adapter = load_adapter(out / "adapter")
    assert {m.rank for m in adapter.modules.values()} == {3}
    assert adapter.config.train_type == "lora" and adapter.scale == pytest.approx(
        adapter.config.lora_alpha / 3, rel=1e-4
    )
    records = [r for r in metrics_without_times(out) if "budget" in r]
    assert all(r["final"] for r in records)  # the pattern is fixed from step 1: nothing is ever masked
    assert {r["orth_weight"] for r in records} == {0.0}
    assert all(float(m.B.abs().max()) > 0 for m in adapter.modules.values())  # every matrix trained


def test_train_type_lora_trains_a_classifier(tmp_path, bert_base):
    """--train_type lora on the encoder path: the adapters stay at r, the fresh head trains and travels."""
    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choices(WORDS, k=5)), "label": rng.choice(["a", "b"])} for _ in range(32)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train(tmp_path / "run", bert_base, data, train_type="lora", adalora_target_r=2, max_steps=4, batch_size=8,
                lr=1e-2, save_steps=0, progress=False).run_dir  # fmt: skip
    adapter = load_adapter(out / "adapter")
    assert {m.rank for m in adapter.modules.values()} == {2} and adapter.config.train_type == "lora"
    assert adapter.extra_weights and adapter.task_info.num_labels == 2  # the head, saved beside the adapter

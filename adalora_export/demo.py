"""The built-in demo: the whole path on a toy model and data set built in-process (no downloads).

1. write a small Llama (random weights) with a word-level tokenizer, and a learnable data set of
   arithmetic progressions ("7 10 13 16 ...": the model must infer the stride), as files;
2. train it with AdaLoRA through ``adalora_export.train.train`` (the code path of ``train``);
3. the run writes the compact adapter (pruned: every layer at its own rank);
4. then, as far as those modules exist: merge into the base weights, export to ONNX, and
   generate with onnxruntime, with the parity figures of each step.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .io import check_output_path

VOCAB_NUMBERS = 100
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def toy_tokenizer(words: list[str]):
    """A word-level tokenizer (whitespace split) over ``words``, with <s> prepended and </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_toy_model(
    path: str | Path,
    words: list[str],
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    num_labels: int | None = None,
) -> Path:
    """Save a randomly initialised ``arch`` (llama, gpt2 or bert) model and its tokenizer as an HF directory."""
    import transformers as tf

    tokenizer = toy_tokenizer(words)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = tf.LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = tf.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            num_labels=num_labels or 2,
        )
        model = tf.BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown toy architecture {arch!r}")
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def progressions(n: int, seed: int, length: tuple[int, int] = (8, 14), max_stride: int = 3) -> list[str]:
    """Arithmetic progressions below VOCAB_NUMBERS, as text: "7 10 13 16 19 22 25 28"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        stride = int(torch.randint(1, max_stride + 1, (1,), generator=g))
        size = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        top = VOCAB_NUMBERS - stride * (size - 1)
        if top <= 0:
            continue
        start = int(torch.randint(0, top, (1,), generator=g))
        out.append(" ".join(str(start + stride * i) for i in range(size)))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _optional(module: str, name: str):
    """A function of a converter module if that module exists yet (other parts of the path land later)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def run_demo(output: str | None = None, steps: int | None = None, overwrite: bool = False) -> dict:
    """Run the whole path and print a summary; returns the figures."""
    # The toy model's matrices are far too small to gain from several threads, and on a busy machine
    # the threads' waiting costs several times the work (measured: 40 s with one thread, 310 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(output, steps, overwrite)
    finally:
        torch.set_num_threads(threads)


def _run_demo(output: str | None, steps: int | None, overwrite: bool) -> dict:
    from .formats import load_adapter
    from .train import train

    started = time.time()
    if output is not None:
        check_output_path(output, overwrite)
        root = Path(output)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
    else:
        root = Path(tempfile.mkdtemp(prefix="adalora-demo-"))
    base = write_toy_model(root / "base", [str(i) for i in range(VOCAB_NUMBERS)], hidden=256, layers=2)
    (root / "data").mkdir()
    train_file = write_jsonl(root / "data" / "train.jsonl", [{"text": t} for t in progressions(4096, seed=1)])
    valid_file = write_jsonl(root / "data" / "valid.jsonl", [{"text": t} for t in progressions(128, seed=2)])
    print(f"demo in {root}: a random-weight Llama (hidden 256, 2 layers) learns arithmetic progressions")

    total = steps or 500
    result = train(
        root / "run",
        model=base,
        data=train_file,
        validation=valid_file,
        max_steps=total,
        batch_size=16,
        lr=2e-2,
        warmup_ratio=0.05,
        max_length=32,
        save_steps=max(1, total // 2),
        eval_steps=max(1, total // 5),
        lora_alpha=32,
        adalora_init_r=8,
        adalora_target_r=4,
        adalora_tinit=total // 10,
        adalora_tfinal=total // 5,
        adalora_deltaT=5,
    )
    adapter_dir = root / "run" / "adapter"
    adapter = load_adapter(adapter_dir)
    summary = {
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "eval_loss_start": result.eval_start.get("eval_loss"),
        "eval_loss_end": result.eval_end.get("eval_loss"),
        "train_seconds": result.wall_time,
        "ranks": result.ranks,
        "adapter_parameters": adapter.num_parameters(),
        "files": [str(p) for p in result.files],
        "skipped": [],
    }
    print(
        f"\ntrained {result.total_step} steps in {result.wall_time:.1f}s: loss {result.loss_start:.3f} -> "
        f"{result.loss_end:.3f}, eval loss {summary['eval_loss_start']:.3f} -> {summary['eval_loss_end']:.3f}"
    )
    print(
        f"pruned adapter {adapter_dir}: {adapter.num_parameters():,} parameters, "
        f"{sum(result.ranks.values())} triplets (budget {result.budget}); ranks per layer:"
    )
    for path, rank in result.ranks.items():
        print(f"  {path:40s} {rank:2d} {'#' * rank}")

    merge = _optional("adalora_export.converters.merge", "merge_into_base")
    if merge is None:
        summary["skipped"].append("merge into the base (converters.merge not available)")
    else:
        report = merge(adapter_dir, root / "merged", base=base, verify=True)
        summary["merge_max_abs_diff"] = report["verify_max_diff"]
        summary["files"].append(str(root / "merged"))
    summary["skipped"] += _onnx_steps(root, adapter_dir, base, summary)
    summary["wall_seconds"] = time.time() - started
    print("\nsummary")
    print(f"  loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f} in {summary['train_seconds']:.1f}s")
    print(f"  ranks: {' '.join(str(r) for r in result.ranks.values())} (init_r 8, target average 4)")
    if "merge_max_abs_diff" in summary:
        print(f"  merged vs base+adapter: max |logit diff| {summary['merge_max_abs_diff']:.2e}")
    if "onnx_max_relative_error" in summary:
        print(f"  ONNX vs torch: max relative error {summary['onnx_max_relative_error']:.2e}")
    if "generation" in summary:
        g = summary["generation"]
        print(f"  onnxruntime greedy: {g['prompt']!r} -> {g['output']!r} (a perfect model: {g['expected']!r})")
    for item in summary["skipped"]:
        print(f"  skipped: {item}")
    print("  files: " + ", ".join(summary["files"]))
    print(f"demo done in {summary['wall_seconds']:.1f}s")
    return summary


def _onnx_steps(root: Path, adapter_dir: Path, base: Path, summary: dict) -> list[str]:
    """ONNX export of the merged model and a greedy generation with onnxruntime, where available."""
    export = _optional("adalora_export.converters.onnx_export", "export_onnx")
    if export is None:
        return ["ONNX export (converters.onnx_export not available)", "onnxruntime generation"]
    onnx_dir = root / "onnx"
    manifest = export(adapter_dir, onnx_dir, base=base, merge=True, with_past=True)
    summary["files"].append(str(onnx_dir))
    summary["onnx_max_relative_error"] = manifest.get("parity", {}).get("max_relative_error")
    server_class = _optional("adalora_export.converters.serving", "OnnxServer")
    if server_class is None:
        return ["onnxruntime generation (converters.serving not available)"]
    prompt = "12 15 18"
    text = server_class(onnx_dir, provider="cpu").generate(prompt, max_new_tokens=6)
    summary["generation"] = {"prompt": prompt, "output": text, "expected": "21 24 27 30 33 36"}
    return []

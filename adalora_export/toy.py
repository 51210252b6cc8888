"""A toy Hugging Face model directory built in-process: random weights and a word-level tokenizer.

The demo trains one; the tests build their small bases with it too (a real transformers model and a
real tokenizer saved with ``save_pretrained``, no downloads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError

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


def toy_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, **extra):
    """The transformers config of a tiny ``arch`` (llama, gpt2 or bert): 4 heads, MLP 2 x hidden."""
    import transformers as tf

    if arch == "llama":
        shape = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4)
        return tf.LlamaConfig(
            vocab_size=vocab_size, num_key_value_heads=2, **{"max_position_embeddings": 256, **shape, **extra}
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, **{"n_positions": 256, **extra}
        )
    if arch == "bert":
        shape = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4)
        return tf.BertConfig(vocab_size=vocab_size, **{"max_position_embeddings": 256, **shape, **extra})
    raise UserError(f"unknown toy architecture {arch!r}")


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
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        ids["pad_token_id"] = tokenizer.pad_token_id
    if arch == "bert":
        ids = dict(num_labels=num_labels or 2)
    config = toy_config(arch, len(tokenizer), hidden, layers, **ids)
    torch.manual_seed(seed)
    classes = {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "bert": tf.BertForSequenceClassification}
    model = classes[arch](config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

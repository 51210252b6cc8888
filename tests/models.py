"""Tiny real transformers models built from configs (no downloads): in memory (``tiny_llama``,
``tiny_gpt2``), as base directories (``make_base`` from an architecture, ``save_base`` for a model
already in memory), and the torch reference output of a base with an adapter."""

from __future__ import annotations

from pathlib import Path

import torch

# The vocabulary of make_base's tokenizer, and of the sentences the tests train on.
WORDS = "the a cat dog bird sat ran flew on under over mat tree house fast slow red blue big small".split()
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, causal_lm: bool = True):
    """A random Llama (``LlamaModel`` with ``causal_lm=False``) in eval mode."""
    from transformers import LlamaForCausalLM, LlamaModel

    from adalora_export.toy import toy_config

    config = toy_config("llama", vocab, hidden, layers, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return (LlamaForCausalLM if causal_lm else LlamaModel)(config).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    """A random GPT-2 LM (Conv1D layers) in eval mode."""
    from transformers import GPT2LMHeadModel

    from adalora_export.toy import toy_config

    config = toy_config("gpt2", vocab, hidden, layers, n_positions=128)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def make_base(
    path: Path,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    words: list[str] | None = None,
    num_labels: int | None = None,
) -> Path:
    """A random-weight model directory (save_pretrained: config, safetensors, a word-level tokenizer over
    ``words``, WORDS by default). llama and gpt2 are causal LMs, bert a classifier (2 labels by default).

    Tests take theirs from the ``tiny_base`` fixture (built once per session); call this for a base
    the test is going to change."""
    from adalora_export.toy import write_toy_model

    words = WORDS if words is None else words
    return write_toy_model(path, words, arch=arch, hidden=hidden, layers=layers, seed=seed, num_labels=num_labels)


def save_base(model: torch.nn.Module, path: Path) -> Path:
    """Save a model held in memory with a word-level tokenizer over its vocabulary (<unk> <s> </s> <pad> w4 w5 ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), model.config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def torch_forward(base_dir: Path, adapter, feeds: dict, task=None):
    """The first output (logits or last hidden state) of the base (+ unmerged adapter) in torch, fp32, as numpy."""
    from adalora_export.hf import load_pretrained

    model = load_pretrained(base_dir, task, dtype=torch.float32).eval()
    if adapter is not None:
        adapter.apply_to(model)
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    if "position_ids" in kwargs:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs)[0].float().numpy()

"""Tiny real transformers models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, causal_lm: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def train_adalora(model, config, steps=None, trainable=None, seed=0, lr=2e-2, vocab=128, on_step=None):
    """Train ``model`` with our AdaLoRA core (inject, allocator, orthogonal term) on random tokens.

    Runs ``steps`` optimizer steps (default ``config.total_step``: through the final phase, so the
    layers end pruned to heterogeneous ranks), calling ``on_step(step, model, allocator)`` after each.
    Returns the allocator; the model is left in eval mode.
    """
    from adalora_export import RankAllocator, inject_adapters, orthogonal_regularizer

    inject_adapters(model, config, trainable=trainable)
    allocator = RankAllocator(model, config, total_step=config.total_step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, (steps or config.total_step) + 1):
        ids = torch.randint(0, vocab, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss + config.orth_reg_weight * orthogonal_regularizer(model)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, model, allocator)
    model.eval()
    return allocator

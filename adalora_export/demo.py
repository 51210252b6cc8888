"""The built-in demo: a short AdaLoRA run on a tiny Llama and a learnable toy data set, no downloads."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .model import adapted_layers, inject_adapters, orthogonal_regularizer, trainable_parameters


def toy_sequences(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Arithmetic progressions mod vocab: a next-token task the base model cannot do and an adapter can learn."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab


def run_demo(output: str | None = None, steps: int | None = None) -> dict:
    """Train a tiny Llama with AdaLoRA on the CPU and print the loss and the final rank pattern."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    total = steps or 120
    config = AdaLoraConfig(init_r=8, target_r=4, tinit=10, tfinal=30, deltaT=5, lora_alpha=16)
    inject_adapters(model, config)
    trainable, params = trainable_parameters(model)
    print(f"tiny Llama: {params:,} parameters, {trainable:,} trainable (AdaLoRA init_r={config.init_r})")
    allocator = RankAllocator(model, config, total_step=total)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = toy_sequences(2048, 24, 64, seed=0)
    start, losses = time.time(), []
    bar = tqdm(range(1, total + 1), desc="train", unit="step")
    for step in bar:
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        (loss + config.orth_reg_weight * orthogonal_regularizer(model)).backward()
        optimizer.step()
        result = allocator.update_and_allocate(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", budget=result.budget, kept=result.kept)
    ranks = {name: layer.rank for name, layer in adapted_layers(model)}
    print(f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} in {time.time() - start:.1f}s")
    print(f"final ranks (budget {allocator.target_budget} = target_r x {len(ranks)} matrices):")
    for name, rank in ranks.items():
        print(f"  {name:45s} {rank:2d} {'#' * rank}")
    return {"losses": losses, "ranks": ranks}

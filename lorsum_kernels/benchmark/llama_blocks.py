"""Transformer blocks with a 7B Llama's shapes, for ``lorsum-bench --memory --model llama7b-blocks``.

The step's share of a training step is set by shapes: one ALS round costs about (m+n)·r / (m·n) of a frozen
layer's forward + backward, ~6% at SmolLM2's width 576 but ~1% at 4096. This model gives the second number
on a machine without a model hub: ``layers`` Llama blocks (hidden 4096, MLP 11008, 32 heads, SiLU MLP,
RMSNorm) with random weights from a fixed seed, and a 256-token vocabulary so that the embedding and the LM
head stay small next to the blocks. What is measured does not depend on the weights' values (dense fp32
kernels), only on the shapes. Built by ``transformers.LlamaForCausalLM`` from a ``LlamaConfig``; the real
model's other dimensions (32 blocks, 32 000 tokens) are left out.
"""

from __future__ import annotations

import importlib.util

import torch

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 256


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("peft") is not None


def load_model(layers: int, tokens: int):
    """``layers`` 7B-shaped Llama blocks with random fp32 weights (seed 0), ready for PEFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, num_hidden_layers=layers, vocab_size=VOCAB,
                         max_position_embeddings=max(tokens, 128), use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()

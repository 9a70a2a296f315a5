"""End to end: a PEFT-wrapped small transformer trains with every LoRSum-family optimizer.

Only the LoRA factors are trainable here (a causal LM on a fixed batch, no head), so a falling loss shows
the factors themselves moving the right way.
"""

from __future__ import annotations

import os

import pytest
import torch

import lorsum_kernels as lk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_peft_llama(seed=0, r=4, alpha=8):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def fixed_batch(seed=0):
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


OPTIMIZERS = {
    # the plain (gradient) steps at SGD-like lrs, and the class defaults' normalised steps
    "lorsum": ("lorsum", dict(lr=5.0, iters=1, normalize_step=False, max_update_norm=1.0)),
    "lorsum_k0_momentum": ("lorsum", dict(lr=5.0, iters=0, momentum=0.9, normalize_step=False,
                                          max_update_norm=1.0)),
    "lorsum_normalized": ("lorsum", dict(lr=1e-2)),
    "scaled_lorsum_normalized": ("scaled_lorsum", dict(lr=1e-2)),
    "scaled_lorsum_kfac": ("scaled_lorsum", dict(lr=2.0, betas=(0.9, 0.9), damping=1e-4,
                                                 normalize_step=False)),
    "scaled_lorsum_shampoo": ("scaled_lorsum", dict(lr=2.0, betas=(0.0, 0.9), metric="shampoo", damping=1e-4,
                                                    beta2_warmup=False, max_update_norm=1.0,
                                                    normalize_step=False)),
    "svdlora": ("svdlora", dict(lr=10.0)),
}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_peft_model_loss_falls(case):
    name, kwargs = OPTIMIZERS[case]
    model = tiny_peft_llama()
    model.train()
    batch = fixed_batch()
    opt = lk.create_optimizer(model, name, **kwargs)
    assert len(lk.find_lora_layers(model)) == 2 * len(TARGETS)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state["skipped_steps"].item() == 0
    assert losses[-1] < 0.98 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses

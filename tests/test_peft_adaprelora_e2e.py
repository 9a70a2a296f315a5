"""End to end: a tiny randomly initialised Llama wrapped by PEFT LoRA (attention projections, standard
init with B = 0, α/r = 2) trains with each optimizer of spec/adaprelora.md and spec/lora_one.md §3."""

from __future__ import annotations

import pytest
import torch

import lorsum_kernels as lk

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_peft_llama(seed=0):
    torch.manual_seed(seed)
    # num_key_value_heads=2: k_proj/v_proj are 16×32, q_proj/o_proj 32×32, so there are two buckets.
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)


CASES = [
    ("adaprelora", dict(lr=1e-2)),
    ("adaprelora", dict(lr=1e-2, statistics="surrogate")),
    ("adaprelora", dict(lr=1e-2, momentum="adam")),
    ("adaprelora", dict(lr=1e-2, momentum=None, betas=(0.9, 0.999))),
    ("scaled_gd", dict(lr=1.0)),
    ("scaled_adamw", dict(lr=3e-2)),
]


def _case_id(c):
    return c if isinstance(c, str) else "-".join(map(str, c.values()))


@pytest.mark.parametrize("name,kw", CASES, ids=_case_id)
def test_loss_falls(name, kw):
    model = tiny_peft_llama()
    opt = lk.create_optimizer(model, name, **kw)
    assert len(lk.find_lora_layers(model)) == 8
    ids = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=ids).loss.item()]
    for _ in range(10):
        opt.zero_grad()
        # Two micro-batches per step: with the exact statistics the captured rows are concatenated.
        for half in ids.chunk(2):
            loss = model(input_ids=half, labels=half).loss / 2
            loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert int(opt.state["skipped_steps"]) == 0
    # Only LoRA factors moved, and no m×n tensor is in the optimizer state.
    for layer in lk.find_lora_layers(model):
        st = opt.state[layer.A]
        assert int(st["step"]) == 10
        assert all(v.numel() < layer.in_features * layer.out_features for v in st.values())

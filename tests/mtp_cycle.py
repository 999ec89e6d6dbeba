"""A tiny model with one MTP module, and a repeating token cycle to train it on until its drafts are mostly right:
the speculative-decoding tests' shared model."""

from __future__ import annotations

import torch

from seekforge.model import ModelConfig, Transformer

MTP_CFG = ModelConfig(vocab_size=64, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
                      n_heads=4, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                      max_seq_len=256, n_mtp_modules=1, init_std=0.1, eos_token_id=None)
CYCLE = [5, 9, 12, 33, 7, 21, 40, 2, 17, 50, 3]


def train_on_cycle(model: Transformer, steps: int) -> Transformer:
    """`steps` AdamW steps on windows of the repeating cycle, main head and MTP module alike; returns it in eval."""
    data = torch.tensor(CYCLE * 20, device=model.embed.weight.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(CYCLE), (8,)).tolist()
        batch = torch.stack([data[s:s + 49] for s in starts])
        out = model.loss(batch[:, :-1], batch[:, 1:], mtp_weight=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()

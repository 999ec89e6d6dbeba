"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Keys and values of all heads are compressed into one latent per token (kv_lora_rank wide, normalised)
plus one small rotary key shared by the heads (qk_rope_head_dim). Two equivalent ways to attend:

- explicit: up-project the latent with W_UK/W_UV (wkv_b) into per-head keys and values, then ordinary
  attention. Cheapest when many queries share the keys (training, prefill).
- absorbed: fold W_UK into the query and W_UV into the output, and attend over the latent itself.
  Only the latent and the rotary key are ever read: this is what the inference engine caches.

Shapes: b batch, s query positions, t key positions, h heads, d nope/value head dim, r rope dim,
c kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekforge.model.config import ModelConfig
from seekforge.model.norm import RMSNorm
from seekforge.ops.rotary import apply_rotary


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        q_out = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_out, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)

    @property
    def input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two projections of the block's normalised input: the query's first (wq, or wq_a with a query
        LoRA) and wkv_a."""
        return (self.wq_a if hasattr(self, "wq_a") else self.wq), self.wkv_a

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, s, dim] -> q_nope [b, s, h, d], q_pe [b, s, h, r] (rotated)."""
        return self.query_from(self.input_projections[0](x), cos, sin)

    def query_from(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`query` from the first projection of x (wq's output, or wq_a's)."""
        q_nope, q_pe = self.query_heads(q)
        return q_nope, apply_rotary(q_pe, cos, sin)

    def query_heads(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first projection of x -> q_nope [b, s, h, d], q_pe [b, s, h, r] not yet rotated."""
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(q))
        q = q.view(*q.shape[:-1], self.n_heads, -1)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, s, dim] -> what the cache holds: kv [b, s, c] (normalised latent), k_pe [b, s, r] (rotated)."""
        return self.latent_from(self.wkv_a(x), cos, sin)

    def latent_from(self, kv_a: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`latent` from wkv_a's output."""
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_norm(kv), k_pe

    def attend(self, q_nope, q_pe, kv, k_pe, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit path. mask: bool [b|1, s, t], True = may attend; None = causal over s == t.
        Returns [b, s, h * d_v]."""
        k_nope, v = self.wkv_b(kv).unflatten(-1, (self.n_heads, -1)).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None, scale=self.softmax_scale)
        return out.transpose(1, 2).flatten(2)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [h, d, c] and W_UV [h, d_v, c]: views of wkv_b."""
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)  # [h, d + d_v, c]
        return wkv_b[:, :self.nope_dim], wkv_b[:, self.nope_dim:]

    def attend_absorbed(self, q_nope, q_pe, kv, k_pe, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed path over the latent itself; same arguments and result as `attend`."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = (torch.einsum("bshc,btc->bsht", q_latent.float(), kv.float())  # fp32, as attention kernels keep
                  + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())) * self.softmax_scale  # scores
        if mask is None:
            s, t = scores.shape[1], scores.shape[3]
            mask = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s).unsqueeze(0)
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, kv)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv).flatten(2)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, absorb: bool = False) -> torch.Tensor:
        q_nope, q_pe = self.query(x, cos, sin)
        kv, k_pe = self.latent(x, cos, sin)
        attend = self.attend_absorbed if absorb else self.attend
        return self.wo(attend(q_nope, q_pe, kv, k_pe, mask))

"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Keys and values of all heads are compressed into one latent per token (kv_lora_rank wide, normalised)
plus one small rotary key shared by the heads (qk_rope_head_dim). `forward` projects the normalised input
(`project`), makes the query heads (`query`) and the latents (`latent`), and attends in one of two equivalent
ways:

- explicit (`attend`): up-project the latent with W_UK/W_UV (wkv_b) into per-head keys and values, then
  ordinary attention. Cheapest when many queries share the keys (training, prefill).
- absorbed (`attend_absorbed`): fold W_UK into the query and W_UV into the output, and attend over the latent
  itself (`attend_latents`, from `seekforge.ops.mla_decode`). Only the latent and the rotary key are ever
  read: this is what the inference engine caches, and its paged decode kernel computes `attend_latents` over
  that cache.

Which way, and over what context, is the backend's choice (`seekforge.model.backend`): the default attends
explicitly over the forward's own tokens; the engine's over its paged cache.

Dynamic sparse heads (an experimental inference option, off by default: `Backend(keep_heads=k)`, the engine's
`sparse_heads`): in the absorbed form each query keeps only its k heads of largest content-query norm
(`kept_heads`); only those attend over the latents (`select_heads`), and the others' attention-weighted latents
are zero (`place_heads`), so their outputs are. W_UK and W_UV stay dense products: the same weights for every
query, read once, where per-query gathered slices of them cost more than they save (docs/EXPERIMENTAL.md).

Shapes: b batch, s query positions, t key positions, h heads, k kept heads, d nope/value head dim, r rope dim,
c kv_lora_rank. The explicit path takes h from the projections' outputs, not from the config, so it runs as well
on projections that hold a subset of the heads.
"""

from __future__ import annotations

import torch
from torch import nn

from seekforge.model.backend import EXPLICIT, Backend
from seekforge.model.config import ModelConfig
from seekforge.model.norm import RMSNorm
from seekforge.ops.attention import dot_product_attention
from seekforge.ops.gemv import projections
from seekforge.ops.mla_decode import attend_latents
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                backend: Backend = EXPLICIT, norm: nn.Module | None = None) -> torch.Tensor:
        """x [b, s, dim], normalised (or normalised here by `norm`, the block's input norm, which a backend may
        fuse with the projections) -> [b, s, dim]. mask: bool [b|1, s, t], True = may attend; None = causal."""
        return self.wo(backend.attend(self, norm, x, cos, sin, mask))

    @property
    def input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two projections of the normalised input: the query's first (wq, or wq_a with a query LoRA) and
        wkv_a."""
        return (self.wq_a if hasattr(self, "wq_a") else self.wq), self.wkv_a

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised x [b, s, dim] -> (q, kv_a): the query's first projection and wkv_a's output (together: FP8
        layers quantise x once for both, `projections`)."""
        return projections(x, *self.input_projections)

    def query_heads(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's first projection -> q_nope [b, s, h, d], q_pe [b, s, h, r], not yet rotated."""
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.q_norm(q))
        q = q.view(*q.shape[:-1], -1, self.nope_dim + self.rope_dim)  # the heads wq_b's output holds
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`query_heads` with q_pe rotated."""
        q_nope, q_pe = self.query_heads(q)
        return q_nope, apply_rotary(q_pe, cos, sin)

    def latent(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_a's output [b, s, c + r] -> what the engine caches: kv [b, s, c] (normalised latent), k_pe [b, s, r]
        (rotated)."""
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_norm(kv), k_pe

    def attend(self, q_nope, q_pe, kv, k_pe, mask: torch.Tensor | None = None, sdpa=None) -> torch.Tensor:
        """Explicit path. mask: bool [b|1, s, t], True = may attend; None = causal over s == t. `sdpa` (q, k, v,
        mask, scale) -> [b, s, h, d_v] runs the attention itself: `dot_product_attention` where not given.
        Returns [b, s, h * d_v]."""
        heads = self.wkv_b(kv).unflatten(-1, (-1, self.nope_dim + self.v_dim))  # the heads wkv_b's output holds
        k_nope, v = heads.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return (sdpa or dot_product_attention)(q, k, v, mask, self.softmax_scale).flatten(2)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [h, d, c] and W_UV [h, d_v, c]: views of wkv_b."""
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)  # [h, d + d_v, c]
        return wkv_b[:, :self.nope_dim], wkv_b[:, self.nope_dim:]

    def attend_absorbed(self, q_nope, q_pe, kv, k_pe, mask: torch.Tensor | None = None,
                        keep: int | None = None) -> torch.Tensor:
        """Absorbed path over the latent itself; same arguments and result as `attend`. `keep`: dynamic sparse
        heads, each query attends with its `keep` heads chosen by `kept_heads` and the others' outputs are zero
        (None, or every head: all heads, the dense computation)."""
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        if keep is not None and keep < self.n_heads:
            heads = self.kept_heads(q_nope, keep)
            out_latent = attend_latents(self.select_heads(q_latent, heads), self.select_heads(q_pe, heads), kv, k_pe,
                                        mask, self.softmax_scale)
            out_latent = self.place_heads(out_latent, heads)
        else:
            out_latent = attend_latents(q_latent, q_pe, kv, k_pe, mask, self.softmax_scale)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv).flatten(2)

    def kept_heads(self, q_nope: torch.Tensor, keep: int) -> torch.Tensor:
        """Dynamic sparse heads' criterion: the `keep` heads of each query with the largest content-query norm
        |q_nope| ([..., h, d] -> [..., keep] int64, in ascending head order). A head's content logits are its q_nope
        against keys every head derives from one shared, normalised latent, so they scale with its norm: a small
        norm means a flatter softmax that returns closer to the context's mean, the current step's proxy for the
        head's attention entropy, read before any attention runs, with no state across steps and no training. The
        rotary part is left out so that the choice is bit for bit the same wherever q_pe is rotated (before or
        inside a fused kernel)."""
        return q_nope.float().norm(dim=-1).topk(keep, dim=-1).indices.sort(dim=-1).values

    def select_heads(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The kept heads' rows of x [..., h, w]: heads [..., k] -> [..., k, w]."""
        return x.take_along_dim(heads.unsqueeze(-1), dim=-2)

    def place_heads(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The kept heads' rows x [..., k, w] at their heads [..., k] among zero rows: [..., h, w]."""
        full = x.new_zeros(*x.shape[:-2], self.n_heads, x.shape[-1])
        return full.scatter(-2, heads.unsqueeze(-1).expand_as(x), x)

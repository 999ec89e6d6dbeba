"""How the blocks run: the one seam between the model's math and whoever runs it.

A block calls its backend twice: for its attention (`attend`: the input norm, MLA's projections, the query and
the latents, attention over the context) and for its second half (`feed_forward`: the residual, the FFN's norm,
the FFN, the residual again). This class is the model's own math in plain PyTorch, what training, evaluation and
the tests run: explicit MLA, causal or under the forward's mask, or the absorbed form with `absorbed=True` (with
`keep_heads`, dynamic sparse heads: `MLA.attend_absorbed`).

The inference engine (`seekforge.engine.paged_backend`) passes a subclass that keeps the latents in its paged
cache, attends over them with its kernels, and fuses some steps into one launch; each of its hooks computes what
the default computes, from the model's own modules (`MLA.query`, `MLA.latent`, `MLA.attend`, ...). The model
never imports the engine, and the default holds no state: one instance serves every forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from seekforge.model.mlp import MLP
from seekforge.model.moe import MoE, Routing

if TYPE_CHECKING:
    from seekforge.model.mla import MLA


class Backend:
    def __init__(self, absorbed: bool = False, topk: int | None = None, keep_heads: int | None = None):
        self.absorbed = absorbed  # attend over the latents (as the engine does) instead of the explicit form
        self.topk = topk  # routed experts a token in every MoE block (None: the config's n_activated_experts)
        # dynamic sparse heads: each query's heads in the absorbed form (which they imply; None: all of them)
        self.keep_heads = keep_heads

    def attend(self, mla: MLA, norm: nn.Module | None, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """MLA's attention before its output projection: x [b, s, dim] normalised by `norm` (the block's input
        norm; None: x is normalised already) -> every query's view of its context, [b, s, h * d_v]. mask: bool
        [b|1, s, t], True = may attend; None = causal."""
        q, kv_a = mla.project(x if norm is None else norm(x))
        q_nope, q_pe = mla.query(q, cos, sin)
        kv, k_pe = mla.latent(kv_a, cos, sin)
        if self.keep_heads is not None:
            return mla.attend_absorbed(q_nope, q_pe, kv, k_pe, mask, self.keep_heads)
        return (mla.attend_absorbed if self.absorbed else mla.attend)(q_nope, q_pe, kv, k_pe, mask)

    def feed_forward(self, norm: nn.Module, ffn: MoE | MLP, x: torch.Tensor,
                     delta: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        """A block's second half: h = x + delta (the attention's output), then h + ffn(norm(h)). Returns that and
        the MoE's routing (None for a dense FFN)."""
        h = x + delta
        if not isinstance(ffn, MoE):
            return h + ffn(norm(h)), None
        y, routing = ffn(norm(h), self.topk)
        return h + y, routing


EXPLICIT = Backend()

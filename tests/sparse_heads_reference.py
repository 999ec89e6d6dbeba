"""A naive reference of dynamic sparse heads, for the model's and the engine's tests: MLA's attention by the
definition, one query, one head at a time, with the heads a query drops zeroed."""

from __future__ import annotations

import torch


def sparse_heads_attention(mla, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: int,
                           context: int = 0) -> torch.Tensor:
    """MLA's attention before its output projection, x [b, s, dim] normalised, causal, in float64: each query
    keeps its `keep` heads of largest |q_nope| (ties to the lower head), the other heads' outputs are zero. Keys
    and values are explicit (wkv_b's up-projection of the latents), not the absorbed form. Returns
    the last s - context queries' [b, s - context, h * d_v]."""
    q, kv_a = mla.project(x)
    q_nope, q_pe = mla.query(q, cos, sin)
    kv, k_pe = mla.latent(kv_a, cos, sin)
    heads = mla.wkv_b(kv).unflatten(-1, (mla.n_heads, mla.nope_dim + mla.v_dim)).double()
    k_nope, v = heads.split([mla.nope_dim, mla.v_dim], dim=-1)
    b, s, h, _ = q_nope.shape
    out = torch.zeros(b, s - context, h, mla.v_dim, dtype=torch.float64)
    for i in range(b):
        for j in range(context, s):
            norms = [q_nope[i, j, n].double().norm().item() for n in range(h)]
            kept = sorted(range(h), key=lambda n: (-norms[n], n))[:keep]
            for n in kept:
                scores = torch.stack([(q_nope[i, j, n].double() @ k_nope[i, t, n]
                                       + q_pe[i, j, n].double() @ k_pe[i, t].double()) for t in range(j + 1)])
                probs = (scores * mla.softmax_scale).softmax(0)
                out[i, j - context, n] = (probs.unsqueeze(-1) * v[i, :j + 1, n]).sum(0)
    return out.flatten(2)

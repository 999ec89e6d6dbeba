"""The DeepSeek-V3 language model: embedding, MLA + MoE blocks, final norm, output head, MTP modules.

Pure PyTorch: no parallelism, precision or caching policy lives here. Trainers call `loss`. How the blocks attend
and which kernels run them is the backend's (`seekforge.model.backend`): by default the model's own math, explicit
MLA over the forward's tokens; the inference engine runs the same blocks (and the first MTP module, its drafter)
with its own backend, over its paged latent cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekforge.model.backend import EXPLICIT, Backend
from seekforge.model.block import Block
from seekforge.model.config import ModelConfig
from seekforge.model.moe import MoE, Routing
from seekforge.model.mtp import MTPModule, depth_targets
from seekforge.model.norm import RMSNorm
from seekforge.model.rope import RotaryEmbedding


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside are `dtype`: a model built in its run's dtype never holds an fp32 copy (the 16b
    preset in fp32 is 63 GB)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass
class ModelLoss:
    loss: torch.Tensor  # main + mtp_weight * mtp + balance
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor | None  # mean over MTP depths
    balance_loss: torch.Tensor | None  # sequence-wise balance loss (already times alpha)
    expert_load: dict[int, torch.Tensor]  # tokens per expert of each MoE layer that ran, by layer id
    logits: torch.Tensor | None = None  # the main head's [b, s, vocab], for losses built on top (distillation)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + i) for i in range(cfg.n_mtp_modules))
        self.rope = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zeros for gate biases; deterministic
        under torch.manual_seed. Also (re)computes non-persistent buffers, e.g. after `to_empty`."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        for moe in self.moe_layers().values():
            nn.init.normal_(moe.gate.weight, 0.0, std)
            moe.gate.bias.zero_()
            for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
                nn.init.normal_(w, 0.0, std)

    def blocks(self) -> list[Block]:
        """The transformer blocks: the main layers, then each MTP module's block."""
        return [*self.layers, *(m.block for m in self.mtp)]

    def moe_layers(self) -> dict[int, MoE]:
        """Every MoE by the layer id of its block: main layers 0 .. n_layers - 1, then the MTP modules' blocks from
        n_layers on; the ids `hidden` and `mtp_logits` report routing under."""
        return {b.layer_id: b.ffn for b in self.blocks() if isinstance(b.ffn, MoE)}

    def num_parameters(self) -> dict[str, int]:
        """Total parameters, and those active for one token (shared + k routed experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for moe in self.moe_layers().values():
            per_expert = sum(w[0].numel() for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
            inactive += (moe.experts.n_experts - self.cfg.n_activated_experts) * per_expert
        mtp = sum(p.numel() for p in self.mtp.parameters())
        return {"total": total, "active": total - inactive, "embedding": self.embed.weight.numel(), "mtp": mtp}

    # ---------------------------------------------------------------- forward
    def positions_like(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)

    def hidden(self, tokens: torch.Tensor, positions=None, mask=None,
               backend: Backend = EXPLICIT) -> tuple[torch.Tensor, dict[int, Routing]]:
        """tokens [b, s] -> (the last block's output [b, s, dim] before the final norm, the routing of every MoE
        layer by layer id). `backend` runs the blocks (`Backend(absorbed=True)`: absorbed MLA)."""
        cos, sin = self.rope(self.positions_like(tokens) if positions is None else positions)
        h = self.embed(tokens)
        routing = {}
        for layer in self.layers:
            h, routed = layer(h, cos, sin, mask, backend)
            if routed is not None:
                routing[layer.layer_id] = routed
        return h, routing

    def forward(self, tokens: torch.Tensor, positions=None, mask=None, backend: Backend = EXPLICIT) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]. mask: bool [b|1, s, t] (True = may attend), None = causal;
        backend as `hidden` takes it."""
        return self.head(self.norm(self.hidden(tokens, positions, mask, backend)[0]))

    def logits_at(self, tokens: torch.Tensor, at: torch.Tensor, positions=None,
                  mask=None) -> tuple[torch.Tensor, dict[int, Routing]]:
        """Logits at chosen positions only (the head runs on those): `at` [...] indexes the flattened [b * s]
        positions of `tokens`; returns (logits [*at.shape, vocab], the routing as `hidden` returns it).
        positions and mask as in `forward`."""
        h, routing = self.hidden(tokens, positions, mask)
        return self.head(self.norm(h.flatten(0, 1)[at])), routing

    def mtp_logits(self, tokens: torch.Tensor, h: torch.Tensor, positions=None,
                   mask=None) -> tuple[list[torch.Tensor], dict[int, Routing]]:
        """Logits of every MTP depth for a forward of `tokens` (with `positions`/`mask` as given to `hidden`)
        whose main hidden state is h, and the routing of the MTP blocks that ran, by layer id. Depth k returns
        [b, s - k, vocab]; its position i predicts token i + k + 1."""
        out, routing = [], {}
        for k, module in enumerate(self.mtp, start=1):
            s = tokens.shape[1] - k
            if s <= 0:
                break
            cos, sin = self.rope(self.positions_like(tokens[:, :s]) if positions is None else positions[:, :s])
            h, routed = module(h[:, :s], self.embed(tokens[:, k:]), cos, sin, None if mask is None else mask[:, :s, :s])
            if routed is not None:
                routing[module.block.layer_id] = routed
            out.append(self.head(module.norm(h)))
        return out, routing

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_weight: float = 0.0,
             balance_alpha: float = 0.0, ignore_index: int = -100, positions=None, mask=None) -> ModelLoss:
        """Cross-entropy of next-token prediction; labels [b, s] are tokens shifted by one (ignore_index
        where no target). MTP depth k is scored against labels[:, k:]. positions and mask as in `forward`
        (packed documents: positions restart at 0 for each, mask keeps them apart); where positions do not
        run on for k steps, depth k's target lies in another document and is ignored. The balance loss and the
        expert load cover the MoE layers of this forward: the MTP blocks only where they ran (mtp_weight > 0)."""
        h, routing = self.hidden(tokens, positions, mask)
        logits = self.head(self.norm(h))
        main = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)
        mtp = None
        if self.cfg.n_mtp_modules and mtp_weight:
            depths, mtp_routing = self.mtp_logits(tokens, h, positions, mask)
            routing.update(mtp_routing)
            losses = [F.cross_entropy(lg.flatten(0, 1).float(), depth_targets(labels, k, positions, ignore_index)
                                      .flatten(), ignore_index=ignore_index)
                      for k, lg in enumerate(depths, start=1)]
            mtp = torch.stack(losses).mean() if losses else None
        balance = None
        if balance_alpha and routing:  # a dense model has nothing to balance
            balance = balance_alpha * sum(sequence_balance_loss(r.scores, r.indices) for r in routing.values())
        total = main
        if mtp is not None:
            total = total + mtp_weight * mtp
        if balance is not None:
            total = total + balance
        return ModelLoss(total, main, mtp, balance, {layer: r.load for layer, r in routing.items()}, logits)

    def save_pretrained(self, path, **kwargs) -> None:
        from seekforge.model.hf import save_pretrained

        save_pretrained(self, path, **kwargs)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.
    scores [b, s, experts] (affinities), indices [b, s, k] (chosen experts)."""
    n_experts, k, s = scores.shape[-1], indices.shape[-1], indices.shape[1]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).sum(dim=1)  # [b, experts]
    f = chosen * n_experts / (k * s)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()

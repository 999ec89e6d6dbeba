"""The MoE router: scores, group-limited top-k selection with the balancing bias, and gate weights.

The fp32 bias (e_score_correction_bias) only changes *which* experts are chosen; the weights always
come from the unbiased scores. The trainer moves the bias after each step (auxiliary-loss-free
balancing); no optimizer ever touches it, which is why it is a buffer and not a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekforge.model.config import ModelConfig


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.topk_method = cfg.score_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    @property
    def group_limited(self) -> bool:
        """Whether the top-k is taken within the best expert groups (V3's noaux_tc, V2's group_limited_greedy)
        rather than over all experts."""
        return self.n_groups > 1 and self.topk_method != "greedy"

    def forward(self, x: torch.Tensor, topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, dim] -> weights [n, k] (fp32), expert indices [n, k], scores [n, experts] (fp32). `topk` chooses k
        experts a token for this forward instead of the config's (None); the weights are normalised over those k
        where the config says (norm_topk_prob), as at the config's k."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions stay in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.bias
        if self.group_limited:
            grouped = choice.view(*choice.shape[:-1], self.n_groups, -1)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1, sorted=False).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        # unsorted: the experts' outputs are summed, so their order is irrelevant, and sorting costs a kernel
        indices = choice.topk(self.topk if topk is None else topk, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores

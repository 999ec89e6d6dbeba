"""The GRPO objective as pure tensor functions: rewards to advantages, the clipped policy loss with its
three aggregations, and the k3 KL estimator. No model, no state; every formula is tested by hand.

Shapes: B prompts (groups), G samples per prompt, F reward functions, N = B*G sequences, T completion
positions (right-padded; `mask` marks real, trained tokens).

Rewards to advantages (`combine_rewards`, then `group_advantages`):
- a reward function returns None (NaN here) when it cannot judge a sample. Within a group, a function
  that judged none of the samples cannot tell them apart and contributes nothing; one that judged only
  some excludes the others (their totals would not be comparable). Excluded samples get advantage 0
  and stay out of the group's mean and std.
- A_i = (r_i - mean of the group) / (std + eps), where std is the group's (GRPO, the R1 paper), the
  whole batch's (scale "batch", as in "Tricks or Traps" / PPO-lite), or 1 (scale "none", Dr. GRPO).
  std is the sample standard deviation (n - 1), as TRL's GRPOTrainer computes it.

Policy loss per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3, with
ratio = exp(logp - old_logp) and k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's estimator of
KL(pi || ref), unbiased and never negative). eps_high > eps_low is DAPO's clip-higher.

Aggregation (`loss_type`):
- "grpo": mean over each sequence's tokens, then mean over sequences (the R1 paper's 1/|o_i|);
- "bnpo": sum over all tokens / number of tokens in the local batch, the tensors passed in (TRL's bnpo:
  with gradient accumulation each micro-batch is its own token mean and the trainer averages them);
- "dapo": sum over all tokens / number of tokens in the whole batch (token-level, DAPO);
- "dr_grpo": sum over all tokens / (number of sequences * max_tokens), a constant (Dr. GRPO).
With gradient accumulation, pass the whole batch's `num_sequences` / `num_tokens` so that micro-batches
add up to exactly the full batch's loss (bnpo ignores them: its normaliser is local by definition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from seekforge.errors import ConfigError

if TYPE_CHECKING:
    from seekforge.engine.sampler import SamplingBatch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")


def combine_rewards(per_fn: torch.Tensor, weights: torch.Tensor | list | None = None) -> torch.Tensor:
    """per_fn [B, G, F] (NaN = not judged) -> weighted total [B, G] (NaN = excluded), by the rule above.
    weights [F], or [B, F]: each group's own (a mixed run's groups weigh their own task's functions)."""
    if per_fn.dim() != 3:
        raise ValueError(f"per_fn must be [groups, samples, functions], got shape {tuple(per_fn.shape)}")
    w = torch.ones(per_fn.shape[-1], dtype=per_fn.dtype) if weights is None else torch.as_tensor(weights, dtype=per_fn.dtype)
    if w.dim() == 2:
        w = w.unsqueeze(1)  # [B, 1, F]
    judged = ~per_fn.isnan()  # [B, G, F]
    active = judged.any(dim=1, keepdim=True)  # the function judged someone in the group
    total = (per_fn.nan_to_num(0.0) * w).sum(-1)
    excluded = (active & ~judged).any(-1)  # an active function did not judge this sample
    nobody = ~active.any(-1).expand_as(excluded)  # no function judged anyone in the group
    return total.masked_fill(excluded | nobody, float("nan"))


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [B, G] (NaN = excluded) -> advantages [B, G] (0 where excluded)."""
    if scale not in SCALES:
        raise ConfigError(f"unknown advantage scaling {scale!r}; use one of {', '.join(SCALES)}")
    valid = ~rewards.isnan()
    count = valid.sum(-1, keepdim=True)
    r = rewards.nan_to_num(0.0)
    mean = r.sum(-1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, r - mean, torch.zeros_like(r))
    if scale == "group":
        var = centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt()
    elif scale == "batch":
        flat = rewards[valid]
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    else:
        return centred
    return centred / (std + eps)


def groups_with_signal(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [B, G] (NaN = excluded) -> [B] bool: the group holds two judged samples that differ
    (DAPO's dynamic sampling keeps only these; the others give every sample advantage 0)."""
    valid = ~rewards.isnan()
    hi = rewards.masked_fill(~valid, float("-inf")).amax(-1)
    lo = rewards.masked_fill(~valid, float("inf")).amin(-1)
    return hi > lo


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    # statistics as sums over this (micro-)batch's masked tokens; divide by the token count to average
    clipped_low: float  # tokens where the lower clip bound is active (ratio < 1 - eps_low, A < 0)
    clipped_high: float  # tokens where the upper clip bound is active (ratio > 1 + eps_high, A > 0)
    kl: float  # sum of k3 (0 without a reference)
    tokens: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str = "grpo", eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, max_tokens: int | None = None,
                num_sequences: int | None = None, num_tokens: int | None = None) -> PolicyLoss:
    """logp, old_logp, ref_logp, mask [N, T]; advantages [N]. See the module doc for the formula.

    num_sequences / num_tokens: the normalisers of the full batch when this is a micro-batch (default:
    this batch's own: sequences with at least one masked-in token, and masked-in tokens); bnpo always
    uses this batch's own token count."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if beta:
            per_token = per_token + beta * kl
    if loss_type == "grpo":
        lengths = mask.sum(-1)
        seq = (per_token * mask).sum(-1) / lengths.clamp(min=1)
        n = num_sequences if num_sequences is not None else int((lengths > 0).sum())
        loss = seq.sum() / max(n, 1)
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / max(int(mask.sum()), 1)
    elif loss_type == "dapo":
        n = num_tokens if num_tokens is not None else int(mask.sum())
        loss = (per_token * mask).sum() / max(n, 1)
    else:
        if not max_tokens:
            raise ValueError("loss_type 'dr_grpo' needs max_tokens (the generation budget)")
        n = num_sequences if num_sequences is not None else int((mask.sum(-1) > 0).sum())
        loss = (per_token * mask).sum() / (max(n, 1) * max_tokens)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        stats = dict(clipped_low=float((low * mask).sum()), clipped_high=float((high * mask).sum()),
                     kl=float((kl * mask).sum()) if kl is not None else 0.0, tokens=float(mask.sum()))
    return PolicyLoss(loss, **stats)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, sampling: SamplingBatch | None = None) -> torch.Tensor:
    """log p(target) per position: logits [N, T, V], targets [N, T] -> [N, T] (in fp32).

    p is the model's own distribution, or with `sampling` (seekforge.engine.sampler.broadcast_batch) the one the
    engine draws from under those parameters: the sampler's own `filter_logits` (logits / temperature, then
    top-k, top-p, min-p), renormalised over the tokens it keeps. The target stays in that support: the sampler
    kept it when it drew it, and where rounding (bf16 rollouts) or an update since puts it just outside the
    kept set here, its own mass joins the normaliser, so its log-probability stays finite (-inf would make
    the importance ratio NaN)."""
    logits = logits.float()
    if sampling is None:
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    from seekforge.engine.sampler import filter_logits

    rows, index = logits.flatten(0, -2), targets.reshape(-1, 1)
    target = rows.gather(1, index) / sampling.temperature
    kept = filter_logits(rows, sampling)
    if sampling.top_k is not None or sampling.top_p is not None or sampling.min_p is not None:
        kept = kept.scatter(1, index, target)
    return (target - kept.logsumexp(-1, keepdim=True)).view_as(targets)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: logits [N, T, V] -> [N, T] (nats, fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)

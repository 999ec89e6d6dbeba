"""How far the engine's logits are from a reference, beside a peer's: the precision check of bf16 serving.

In bf16 with random weights two correct implementations part ways within a few greedy tokens (near-ties in the
logits flip, and each then continues its own text), so identical greedy text is no test of either. What is
comparable is each one's error against a higher-precision reference, all of them teacher-forced along the same
tokens: `forced_logits` gives the engine's logits along given tokens (its prefill, then one decode step a token,
as it serves them), and `logit_parity` compares them and a peer's (transformers in the same dtype) with the
reference's and passes when the engine's error is at most `factor` times the peer's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seekforge import ops
from seekforge.errors import ConfigError

# How many times transformers' error (in the same dtype, against fp32) the engine's may be: see docs/BENCHMARKS.md.
FACTOR = 1.3


def forced_logits(llm, prompts: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]],
                  groups: Sequence[int] | None = None) -> torch.Tensor:
    """[B, T, vocab] fp32: for each prompt i, the logits the engine computes for the token after it (its prefill),
    then for the token after each of tokens[i][:T - 1] in turn (one decode step each, replayed from the CUDA
    graphs where `llm` captured them, as generation runs them), whatever the engine would have picked. The
    prompts are stepped together in `groups` of these sizes, in order (default: all at once), so that each
    batch size's decode path can be checked. Uses the engine's cache, which must be idle; the prefix cache is
    reset afterwards (its blocks were overwritten)."""
    from seekforge.engine.model_runner import Chunk

    sizes = list(groups) if groups is not None else [len(prompts)]
    steps = len(tokens[0]) if tokens else 0
    if (len(tokens) != len(prompts) or sum(sizes) != len(prompts) or min(sizes, default=1) < 1 or steps < 1
            or any(len(t) != steps for t in tokens) or any(len(p) < 1 for p in prompts)):
        raise ConfigError(f"forced_logits wants as many token lists as prompts ({len(prompts)}), each of one length "
                          f">= 1, non-empty prompts and group sizes >= 1 adding up to the prompts; got "
                          f"{[len(t) for t in tokens]} tokens and groups {sizes}")
    if llm.has_unfinished_requests():
        raise ConfigError("forced_logits needs the engine idle: finish or abort its requests first")
    runner = llm.runner
    bs = runner.block_size
    need = max(sum(-(-(len(prompts[i]) + steps) // bs) for i in range(start, start + size))
               for start, size in zip(_starts(sizes), sizes))
    if need > runner.num_blocks:
        raise ConfigError(f"forced_logits needs {need} cache blocks for its largest group, the engine has "
                          f"{runner.num_blocks}: use smaller groups or shorter prompts")
    out = torch.empty(len(prompts), steps, llm.cfg.vocab_size, dtype=torch.float32, device=runner.device)
    with torch.inference_mode(), ops.backend(llm.kernels):
        for start, size in zip(_starts(sizes), sizes):
            seqs = range(start, start + size)
            tables, first = [], 0
            for i in seqs:
                n = -(-(len(prompts[i]) + steps) // bs)
                tables.append(list(range(first, first + n)))
                first += n
            chunks = [Chunk(table, 0, list(prompts[i])) for table, i in zip(tables, seqs)]
            out[start:start + size, 0] = _step_logits(runner, chunks, [len(prompts[i]) - 1 for i in seqs])
            for t in range(steps - 1):
                chunks = [Chunk(table, len(prompts[i]) + t, [tokens[i][t]]) for table, i in zip(tables, seqs)]
                replayed = runner.decode_logits(chunks)
                logits = _step_logits(runner, chunks, [0] * size) if replayed is None else replayed[0]
                out[start:start + size, t + 1] = logits  # a copy: a graph's logits are its static output
    llm.reset_prefix_cache()
    return out


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _step_logits(runner, chunks, rows_in_chunk: list[int]) -> torch.Tensor:
    """The logits of one row of each chunk (its index within the chunk) after an uncaptured step over them."""
    step = runner.prepare(chunks)
    hidden, _ = runner.forward(step)
    rows = torch.tensor([step.offsets[i] + r for i, r in enumerate(rows_in_chunk)], device=hidden.device)
    return runner.logits(hidden.index_select(0, rows))


def logit_error(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row of [..., vocab]: |l - ref| / |ref| with each row's mean taken out of both (a shift of all logits
    changes no probability), in fp32; NaN where `logits` has any."""
    ref = reference.float() - reference.float().mean(-1, keepdim=True)
    got = logits.float() - logits.float().mean(-1, keepdim=True)
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)


def logit_parity(reference: torch.Tensor, engine: torch.Tensor, peer: torch.Tensor | None, factor: float,
                 floor: float = 0.0) -> dict:
    """The engine's logits and a peer's (each [..., vocab], the same rows; peer None: the reference itself, error
    0) against the reference's: mean `logit_error` of each, their ratio, and how often each row's argmax is the
    reference's. Passes when the engine's error is finite and at most `factor` times the peer's or `floor`."""
    peer = reference if peer is None else peer
    if not reference.shape == engine.shape == peer.shape or reference.dim() < 2:
        raise ConfigError(f"logit_parity wants reference, engine and peer logits of one shape [..., vocab]; got "
                          f"{tuple(reference.shape)}, {tuple(engine.shape)}, {tuple(peer.shape)}")
    errors = {name: logit_error(reference, x).mean().item() for name, x in (("engine", engine), ("peer", peer))}
    best = reference.argmax(-1)
    agree = {name: (x.argmax(-1) == best).float().mean().item() for name, x in (("engine", engine), ("peer", peer))}
    ratio = errors["engine"] / errors["peer"] if errors["peer"] > 0 else float("inf")
    bound = max(factor * errors["peer"], floor)
    return {"engine_error": errors["engine"], "peer_error": errors["peer"], "ratio": ratio, "factor": factor,
            "floor": floor, "engine_argmax_agreement": agree["engine"], "peer_argmax_agreement": agree["peer"],
            "rows": int(best.numel()), "passed": bool(errors["engine"] <= bound)}  # NaN compares False: fails


__all__ = ["FACTOR", "forced_logits", "logit_error", "logit_parity"]

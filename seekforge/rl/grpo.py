"""GRPO with rule-based rewards (DeepSeek-R1), with the DAPO and Dr. GRPO fixes as options.

    seekforge grpo --from runs/base/final --task chain_sum --out runs/rl                  # R1-Zero
    seekforge grpo --from ckpt --task arithmetic --out runs/rl loss_type=dapo eps_high=0.28 dynamic_sampling=true

One step: take `prompts_per_step` training problems, sample `group_size` completions of each on the
inference engine, which runs the policy's own weights in place in one process (no copy, no save/load round trip);
score them with the reward functions (each behind a timeout and an exception barrier); turn rewards
into group-relative advantages; then `mu` optimizer updates over the batch with the clipped objective
of seekforge.rl.loss (optionally KL to the frozen initial model, k3 estimator). Every log-probability
of the update is taken under the distribution the rollouts were drawn from (logits / temperature, then the
engine sampler's own top-k / top-p filter), so the importance ratio compares like with like. With dynamic
sampling, groups whose rewards are all equal (no signal) are dropped and more problems are sampled to
refill the batch. Completions cut off by max_tokens are left out of the loss (mask_truncated).

The update packs each group into one row: the prompt once, then its completions, each attending to the
prompt and to itself only (block mask, positions restarting after the prompt). The logits are those of
separate sequences (tested), for a fraction of the tokens: with R1-Zero's long template the prompt is
most of every sequence. Sequences whose advantage is 0 (all-equal groups) carry no gradient when
beta = 0, so they are not run through the update at all; the loss normalisers still count them, so the
result is the same (except under bnpo, whose normaliser is each micro-batch's own tokens: there they run).

Under torchrun (data parallelism only: parallel.dp_shard / dp_replicate) the policy is sharded by FSDP2 as the
language-model trainers' is, and prompts_per_step stays the step's global count: every rank takes the step's
problems from the stream and samples its contiguous share of the groups on its own engine, whose model is a whole
copy of the policy refreshed after each update. A group's seed is its problem's place in the stream, so the groups
are one process's at any number of ranks. Advantages and metrics are computed over every rank's groups, the loss's
normalisers are the step's, and each rank's loss is scaled by the number of ranks against FSDP2's gradient mean:
the update is one process's on the whole batch (docs/SCALING.md).

Checkpoints, resume, metrics.jsonl, TensorBoard, the bad-step guard and the report are the training loop's
(seekforge.train.loop), as in pretraining. Metrics records carry step = number of updates done: step 0 is the
held-out evaluation of the initial model.
DIR/final holds the trained policy in Hugging Face layout with its tokenizer, whose chat template is the
prompt format trained on (with template=r1_zero, R1-Zero's, so `seekforge chat` and the server pose it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch.distributed.tensor import DTensor

from seekforge.configio import load_config
from seekforge.engine.config import EngineConfig
from seekforge.errors import ConfigError
from seekforge.model.moe import add_load
from seekforge.parallel.mesh import barrier
from seekforge.parallel.parallelize import gathered
from seekforge.tasks import Row, get_task
from seekforge.train.balance import update_expert_bias
from seekforge.train.loop import NON_FINITE, LoopConfig, Trainer
from seekforge.train.optim import set_lr
from seekforge.rl.loss import (LOSS_TYPES, SCALES, combine_rewards, group_advantages, groups_with_signal, policy_loss,
                               token_entropy, token_logprobs)
from seekforge.rl.mixture import REWARD_MODEL, TaskRewards, TaskSource, allocate
from seekforge.rl.reward_model import RewardModelConfig
from seekforge.rl.rollout import Rollouts, Template, generate
from seekforge.train.schedule import LRSchedule


@dataclass
class RolloutEngineConfig(EngineConfig):
    """GRPO's rollout engine: EngineConfig's settings with the trainer's defaults.

    The engine shares the GPU with training. Its KV cache takes gpu_memory_utilization of the GPU's total
    memory less what is in use when it is made (the policy, the reference model, other processes), vLLM's
    meaning; the update's gradients, AdamW state (3x the fp32 weights) and activations come later and need the
    rest. Lower it if the update runs out of memory, raise it for more rollouts in flight; kv_cache_memory
    (bytes) or num_blocks set the cache size outright."""

    gpu_memory_utilization: float = 0.4
    max_num_seqs: int | None = None  # None: a whole step's sequences at once (at least 256)
    cuda_graphs: bool | None = None  # None: on a GPU training in bf16

    def __post_init__(self) -> None:
        self.resolve(max_num_seqs=1, cuda_graphs=False)  # checks every setting now, before the run starts

    def resolve(self, max_num_seqs: int, cuda_graphs: bool) -> EngineConfig:
        """The engine's settings; `max_num_seqs` and `cuda_graphs` where this config leaves them to the trainer."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}
        settings["max_num_seqs"] = max_num_seqs if self.max_num_seqs is None else self.max_num_seqs
        settings["cuda_graphs"] = cuda_graphs if self.cuda_graphs is None else self.cuda_graphs
        return EngineConfig(**settings)


@dataclass
class GRPOConfig(LoopConfig):
    NAME: ClassVar[str] = "grpo"
    init_from: str = ""  # the starting checkpoint (HF layout with its tokenizer): a base model for R1-Zero
    task: str = "chain_sum"
    task_knobs: dict = field(default_factory=dict)
    template: Template = "r1_zero"
    # reward functions: names (accuracy, format, length, repetition), "file.py:function", or
    # {name: ..., option: value}; a comma-separated string or a list
    rewards: str | list = "accuracy,format"
    reward_weights: list[float] | None = None
    reward_timeout_s: float = 5.0
    # several tasks in one run, each with its own rewards and share of the prompts (seekforge.rl.mixture); when
    # given, they replace task, task_knobs, rewards and reward_weights. A task's rewards may name "reward_model"
    tasks: list[TaskSource] = field(default_factory=list)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)  # what "reward_model" scores with
    # rollouts
    steps: int = 100
    prompts_per_step: int = 16  # the step's problems (groups), over all ranks under torchrun
    group_size: int = 8  # G
    max_tokens: int = 256  # completion budget
    # how rollouts are sampled; the update takes every log-probability (policy, old policy, reference) under
    # the same distribution, the engine sampler's logits / temperature then top-k / top-p, so that the
    # importance ratio is that of the distribution the completions were drawn from. top_p / top_k sort the
    # vocabulary at every completion token of the update (memory: lower micro_batch_size if it runs out)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    dynamic_sampling: bool = False  # DAPO: drop all-equal groups and refill
    max_sampling_rounds: int = 4  # refills per step at most
    mask_truncated: bool = True  # leave completions cut by max_tokens out of the loss
    # objective
    # aggregation over tokens (seekforge.rl.loss): grpo, bnpo, dapo, dr_grpo; bnpo normalises by each
    # micro-batch's own tokens, so with it micro_batch_size (and under torchrun the number of ranks) changes
    # the result
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    beta: float = 0.0  # KL weight to the frozen initial model (R1: 0.001)
    mu: int = 1  # optimizer updates per batch of rollouts
    micro_batch_size: int = 64  # sequences per forward/backward (on each rank under torchrun)
    # optimizer: AdamW; warm-up, constant, optional cosine decay to final_lr
    lr: float = 1e-6
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    bias_update_speed: float = 0.0  # auxiliary-loss-free balancing during RL (0: routing bias frozen)
    # evaluation (held-out test split), checkpoints, logging
    eval_every: int = 25
    eval_n: int = 500
    eval_seed: int = 0
    eval_max_tokens: int | None = None  # default: max_tokens
    eval_samples: int = 1  # 1: greedy accuracy; more: mean accuracy of that many samples per problem (R1's pass@1)
    eval_temperature: float = 1.0  # for eval_samples > 1
    save_every: int = 25
    engine: RolloutEngineConfig = field(default_factory=RolloutEngineConfig)  # the rollout engine's settings

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("prompts_per_step", "max_tokens", "max_sampling_rounds", "mu", "micro_batch_size", "eval_n",
                    "eval_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpo config: {key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigError(f"grpo config: group_size must be >= 2 (advantages are relative to the group), "
                              f"got {self.group_size}")
        if self.loss_type not in LOSS_TYPES or self.scale_rewards not in SCALES:
            raise ConfigError(f"grpo config: loss_type must be one of {LOSS_TYPES}, scale_rewards one of {SCALES}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ConfigError(f"grpo config: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0 or self.temperature <= 0 or self.eval_temperature <= 0:
            raise ConfigError("grpo config: beta must be >= 0, temperature and eval_temperature > 0")
        if not (0 < self.top_p <= 1 and self.top_k >= 0):
            raise ConfigError(f"grpo config: need 0 < top_p <= 1 (1: off) and top_k >= 0 (0: off), got {self.top_p}, "
                              f"{self.top_k}")
        if self.warmup_steps + self.decay_steps > self.steps:
            raise ConfigError(f"grpo config: warmup_steps + decay_steps ({self.warmup_steps + self.decay_steps}) "
                              f"exceed steps ({self.steps})")
        sources = self.sources()
        labels = [s.label for s in sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"grpo config: task sources need distinct labels, got {labels}; set tasks[i].label")
        if any(s.uses_reward_model for s in sources) and not self.reward_model.given:
            raise ConfigError("grpo config: a task is rewarded by \"reward_model\" but no reward model is given; set "
                              "reward_model.path=DIR (a `seekforge rm train` checkpoint) or reward_model.url=URL")

    def sources(self) -> list[TaskSource]:
        """The run's task sources: `tasks`, or the single task with the run's rewards."""
        return self.tasks or [TaskSource(task=self.task, knobs=self.task_knobs, rewards=self.rewards,
                                         reward_weights=self.reward_weights)]

    def schedule(self) -> LRSchedule:
        final = self.final_lr if self.decay_steps else self.lr
        return LRSchedule(peak_lr=self.lr, warmup_steps=self.warmup_steps,
                          constant_steps=self.steps - self.warmup_steps - self.decay_steps,
                          decay_steps=self.decay_steps, final_lr=final)

    def eval_config(self, greedy: bool = False):
        """The held-out evaluation of this run (`greedy` forces greedy decoding)."""
        from seekforge.rl.evaluate import EvalConfig

        sampled = self.eval_samples > 1 and not greedy
        sources = self.sources()  # the first task the accuracy rule judges, else the first
        source = next((s for s in sources if "accuracy" in s.reward_names()), sources[0])
        return EvalConfig(task=source.task, task_knobs=source.knobs, n=self.eval_n, seed=self.eval_seed,
                          samples=self.eval_samples if sampled else None, temperature=self.eval_temperature,
                          max_tokens=self.eval_max_tokens or self.max_tokens, template=self.template,
                          reward_timeout_s=self.reward_timeout_s)

    def resume_free(self) -> set[str]:
        free = super().resume_free() | {"eval_n", "eval_seed", "eval_max_tokens", "eval_samples", "eval_temperature",
                                        "engine", "reward_timeout_s", "micro_batch_size"}
        if self.loss_type == "bnpo":  # its normaliser is the micro-batch's
            free.discard("micro_batch_size")
        return free


def load_grpo_config(name_or_path: str | None, overrides: list[str] = ()) -> GRPOConfig:
    return load_config(GRPOConfig, name_or_path or "default", {"default": {}}, list(overrides))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") % 2**62


class PromptStream:
    """An endless, seeded stream of training problems with a resumable cursor."""

    CHUNK = 1024

    def __init__(self, task, seed: int):
        self.task, self.seed, self.cursor = task, seed, 0
        self._chunk: tuple[int, list[Row]] | None = None

    def _rows(self, chunk: int) -> list[Row]:
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = (chunk, self.task.rows("train", self.CHUNK, _seed(self.seed, chunk)))
        return self._chunk[1]

    def take(self, n: int) -> list[Row]:
        out = []
        for _ in range(n):
            out.append(self._rows(self.cursor // self.CHUNK)[self.cursor % self.CHUNK])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


@dataclass
class Sequences:
    """The batch the update trains on: one entry per completion, each pointing at its group's prompt."""

    prompts: list[list[int]]  # one per group
    group: list[int]  # group (prompt) of each completion
    completions: list[list[int]]
    advantages: torch.Tensor  # [N]
    trained: torch.Tensor  # [N] bool: the completion enters the loss (not empty, not masked as truncated)


@dataclass
class PackedBatch:
    """Groups packed one per row: the prompt once, then its completions, each attending to the prompt and
    to itself only (block mask, positions restarting after the prompt). Identical logits to one sequence
    per completion, for a fraction of the tokens: the prompt is computed once per group, not G times."""

    index: list[int]  # the completions (indices into Sequences) of this micro-batch, in row order
    tokens: torch.Tensor  # [b, L]
    positions: torch.Tensor | None  # [b, L]; None: one completion per row, plain causal attention
    mask: torch.Tensor | None  # [b, L, L] bool, True = may attend
    source: torch.Tensor  # [n, T] flat index (row * L + position) of the hidden state predicting each token
    targets: torch.Tensor  # [n, T] the completion tokens
    target_mask: torch.Tensor  # [n, T] bool


def pack_groups(seqs: Sequences, rows: list[list[int]], pad_id: int, device) -> PackedBatch:
    """rows: per packed row, the completions (all of one group) it holds."""
    lengths = [len(seqs.prompts[seqs.group[r[0]]]) + sum(len(seqs.completions[i]) for i in r) for r in rows]
    L = max(lengths)
    b = len(rows)
    tokens = torch.full((b, L), pad_id, dtype=torch.long)
    positions = torch.zeros(b, L, dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(b, 1, 1)  # padding attends to itself only
    index = [i for r in rows for i in r]
    T = max(len(seqs.completions[i]) for i in index)
    source = torch.zeros(len(index), T, dtype=torch.long)
    targets = torch.zeros(len(index), T, dtype=torch.long)
    target_mask = torch.zeros(len(index), T, dtype=torch.bool)
    n = 0
    for row, members in enumerate(rows):
        prompt = seqs.prompts[seqs.group[members[0]]]
        P = len(prompt)
        tokens[row, :P] = torch.tensor(prompt)
        positions[row, :P] = torch.arange(P)
        mask[row, :P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
        offset = P
        for i in members:
            c = seqs.completions[i]
            C = len(c)
            span = slice(offset, offset + C)
            tokens[row, span] = torch.tensor(c)
            positions[row, span] = torch.arange(P, P + C)
            mask[row, span, :P] = True
            mask[row, span, span] = torch.ones(C, C, dtype=torch.bool).tril()
            # token k of the completion is predicted at the prompt's last position (k = 0) or at token k - 1
            source[n, :C] = row * L + torch.tensor([P - 1, *range(offset, offset + C - 1)])
            targets[n, :C] = torch.tensor(c)
            target_mask[n, :C] = True
            offset += C
            n += 1
    if all(len(r) == 1 for r in rows):  # right-padded single sequences: causal attention needs no mask
        positions = mask = None
    return PackedBatch(index, tokens.to(device), None if positions is None else positions.to(device),
                       None if mask is None else mask.to(device), source.to(device), targets.to(device),
                       target_mask.to(device))


class GRPOTrainer(Trainer):
    """The loop's task for GRPO: a step samples and scores its batch of rollouts, then updates on it."""

    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, out_dir: str | Path, resume: bool = False):
        from seekforge.engine import LLM, SamplingParams
        from seekforge.engine.sampler import broadcast_batch
        from seekforge.model.hf import from_pretrained
        from seekforge.tokenizer import Tokenizer

        if not cfg.init_from:
            raise ConfigError("grpo: say which checkpoint to start from (--from CKPT, a HF-layout directory)")
        super().__init__(cfg, out_dir, "grpo_config.yaml", resume=resume, records="count", desc="grpo")
        other = {k: getattr(self.layout, k) for k in ("tp", "ep", "pp") if getattr(self.layout, k) > 1}
        if other:
            raise ConfigError(f"grpo under torchrun runs data parallelism only (parallel.dp_shard, "
                              f"parallel.dp_replicate, parallel.activation_checkpointing); got "
                              f"{', '.join(f'parallel.{k}={v}' for k, v in other.items())}: set it to 1")
        self.tokenizer = Tokenizer.from_pretrained(cfg.init_from)
        # per task source: its task, rewards and prompt stream (the first one's seeded as a single-task run's)
        self.sources = cfg.sources()
        self.tasks = [get_task(s.task, **s.knobs) for s in self.sources]
        self.task_rewards = [TaskRewards(s, cfg.reward_timeout_s) for s in self.sources]
        self.reward_names = list(dict.fromkeys(n for r in self.task_rewards for n in r.names))
        torch.manual_seed(cfg.seed)
        policy = from_pretrained(cfg.init_from, dtype=torch.float32, device=self.device).train()
        # the engine samples from the policy's own parameters in one process; under data parallelism, where they
        # are sharded (FSDP2), from a whole copy on every rank that `_sync_engine` refreshes after each update
        self.rollout_model = policy if self.mesh is None else copy.deepcopy(policy).requires_grad_(False)
        self.optimize(policy)
        self.ref = None
        if cfg.beta > 0:
            self.ref = from_pretrained(cfg.init_from, dtype=torch.float32, device=self.device).eval().requires_grad_(False)
        # the distribution rollouts are drawn from, for the update's log-probabilities
        self.sampling = broadcast_batch(SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k),
                                        self.model.cfg.vocab_size, self.device)
        self.prompts = [PromptStream(task, cfg.seed if k == 0 else _seed(cfg.seed, s.label))
                        for k, (task, s) in enumerate(zip(self.tasks, self.sources))]
        self.reward_model = None
        if any(r.uses_model for r in self.task_rewards):
            from seekforge.rl.reward_model import reward_model_client

            self.reward_model = reward_model_client(cfg.reward_model, self.device)
        self.loop.start(self, map_location=self.device)
        self._sync_engine()
        # the engine computes with the rollout model's own parameters: every update is live at the next rollout
        # On a GPU its plain decode steps replay from CUDA graphs, captured under the training autocast: each replay
        # casts the live fp32 weights again (the autocast cache is off), so the graphs never hold a stale copy.
        engine = cfg.engine.resolve(max_num_seqs=max(256, cfg.prompts_per_step * cfg.group_size),  # a step at once
                                    cuda_graphs=self.device.type == "cuda" and self.amp is not None)
        with self.autocast(cache=False):
            self.llm = LLM(self.rollout_model, engine, tokenizer=self.tokenizer)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {"prompts": self.prompts[0].state_dict()}
        if len(self.prompts) > 1:
            state["task_prompts"] = {s.label: p.state_dict() for s, p in zip(self.sources[1:], self.prompts[1:])}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.prompts[0].load_state_dict(state["prompts"])
        for s, p in zip(self.sources[1:], self.prompts[1:]):
            p.load_state_dict(state["task_prompts"][s.label])

    # ---------------------------------------------------------------- data parallelism
    @property
    def dp(self) -> tuple[int, int]:
        """(this rank's data-parallel index, the number of data-parallel ranks): (0, 1) in one process."""
        return (0, 1) if self.mesh is None else (self.mesh.dp_rank, self.mesh.dp_size)

    def _dp_sum(self, values: list[float]) -> list[float]:
        """`values` summed over the data-parallel ranks (themselves in one process)."""
        if self.mesh is None:
            return list(values)
        return self.mesh.dp_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def _everyone(self, local) -> list:
        """`local` of every data-parallel rank, in rank order ([local] in one process)."""
        return [local] if self.mesh is None else self.mesh.dp_gather(local)

    @torch.no_grad()
    def _sync_engine(self) -> None:
        """Under data parallelism: copy the sharded policy, gathered whole (a collective), into the engine's
        model, in place (the engine's buffers and CUDA graphs keep pointing at them)."""
        if self.mesh is None:
            return
        target = self.rollout_model.state_dict()
        for name, value in self.model.state_dict().items():
            target[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)

    # ---------------------------------------------------------------- rollouts
    def _take(self, n: int) -> tuple[list[Row], list[int], list[int]]:
        """n training problems split among the task sources by share, the source of each, and each one's rollout
        seed: its place in its source's stream, so that a group's completions are the same whichever rank samples
        it and whatever else is in the batch."""
        rows, source_of, seeds = [], [], []
        for k, count in enumerate(allocate(n, [s.share for s in self.sources])):
            first = self.prompts[k].cursor
            rows += self.prompts[k].take(count)
            source_of += [k] * count
            label = () if k == 0 else (self.sources[k].label,)
            seeds += [_seed(self.cfg.seed, "rollout", *label, first + i) for i in range(count)]
        return rows, source_of, seeds

    def _score(self, r: Rollouts, source_of: list[int]) -> None:
        """Every completion's rewards: its task's rule functions one by one, then the reward model's in one batch
        over the completions of the tasks that use it."""
        judged = []
        for i, group in enumerate(r.groups):
            rewards = self.task_rewards[source_of[i]]
            for c in group:
                c.rewards = rewards.score(r.prompts[i], c, r.rows[i])
                if rewards.uses_model:
                    judged.append((r.prompts[i], c))
        if judged:
            scores = self.reward_model.score([p for p, _ in judged], [c.text for _, c in judged])
            for (_, c), value in zip(judged, scores):
                c.rewards[REWARD_MODEL] = value

    def _totals(self, r: Rollouts, source_of: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-function rewards [B, G, F] over the run's reward names (NaN = unjudged, or not the group's task's)
        and the totals [B, G], each group's combined with its task's weights."""
        names = self.reward_names
        per_fn = torch.tensor([[[math.nan if c.rewards.get(n) is None else c.rewards[n] for n in names] for c in group]
                               for group in r.groups], dtype=torch.float64)
        per_fn = per_fn.reshape(len(r.groups), self.cfg.group_size, len(names))
        weights = torch.zeros(len(r.groups), len(names), dtype=torch.float64)
        for i, k in enumerate(source_of):
            rewards = self.task_rewards[k]
            for name, w in zip(rewards.names, rewards.weights):
                weights[i, names.index(name)] = w
        return per_fn, combine_rewards(per_fn, weights)

    def rollout(self) -> tuple[list[tuple[Rollouts, torch.Tensor, torch.Tensor]], dict]:
        """Sample and score this step's groups (refilling under dynamic sampling). Returns the kept parts
        as (rollouts, per-function rewards, totals) and rollout statistics."""
        cfg = self.cfg
        rank, ranks = self.dp
        kept, need = [], cfg.prompts_per_step
        stats = {"groups_sampled": 0, "groups_kept": 0, "zero_std_groups": 0, "rollout_s": 0.0, "scoring_s": 0.0,
                 "rollout_tokens": 0, "sampling_rounds": 0}
        for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            # every rank takes the step's problems from the streams (the same positions everywhere) and samples
            # its share of the groups
            rows, source_of, seeds = self._take(need)
            share = range(len(rows))[rank * len(rows) // ranks:(rank + 1) * len(rows) // ranks]
            rows, source_of, seeds = ([xs[i] for i in share] for xs in (rows, source_of, seeds))
            # a fresh prefix cache per call: rollouts then never depend on what an earlier call left
            # there, so a resumed run repeats the uninterrupted one exactly
            self.llm.reset_prefix_cache()
            start = time.perf_counter()
            with self.autocast(cache=False):  # the fp32 master weights sample in the training precision
                r = generate(self.llm, rows, n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k, max_tokens=cfg.max_tokens, seed=seeds, template=cfg.template)
            self._score(r, source_of)
            stats["rollout_s"] += r.seconds
            stats["scoring_s"] += time.perf_counter() - start - r.seconds
            stats["rollout_tokens"] += r.tokens
            stats["sampling_rounds"] += 1
            per_fn, totals = self._totals(r, source_of)
            signal = groups_with_signal(totals)
            stats["groups_sampled"] += len(rows)
            stats["zero_std_groups"] += int((~signal).sum())
            if cfg.dynamic_sampling:
                keep = signal.nonzero().flatten().tolist()
                if keep:
                    kept.append((_subset(r, keep), per_fn[keep], totals[keep]))
                need -= int(self._dp_sum([len(keep)])[0])
                if need <= 0:
                    break
            else:
                kept.append((r, per_fn, totals))
        stats["groups_kept"] = sum(len(r.groups) for r, _, _ in kept)
        return kept, stats

    def _sequences(self, everyone: list) -> Sequences:
        """Flatten this rank's kept groups into training sequences with their advantages; `everyone`: every
        data-parallel rank's kept parts, in rank order."""
        cfg = self.cfg
        rank = self.dp[0]
        totals = [torch.cat([t for _, _, t in parts]) if parts else torch.zeros(0, cfg.group_size, dtype=torch.float64)
                  for parts in everyone]
        # one computation over every kept group of every rank, so that scale "batch" sees the whole step
        start = sum(len(t) for t in totals[:rank])
        adv = group_advantages(torch.cat(totals), cfg.scale_rewards)[start:start + len(totals[rank])]
        parts = everyone[rank]
        prompts, group, completions, trained = [], [], [], []
        for r, _, _ in parts:
            for i, samples in enumerate(r.groups):
                for c in samples:
                    group.append(len(prompts))
                    completions.append(c.token_ids)
                    trained.append(bool(c.token_ids) and not (cfg.mask_truncated and c.truncated))
                prompts.append(r.prompt_ids[i])
        return Sequences(prompts, group, completions, adv.flatten().float(), torch.tensor(trained, dtype=torch.bool))

    # ---------------------------------------------------------------- the update
    def _logits(self, model, batch: PackedBatch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [n, T, vocab] predicting every completion token of the batch, and the tokens per expert of
        each MoE layer that ran, by layer id (the main layers: the MTP modules predict nothing here)."""
        logits, routing = model.logits_at(batch.tokens, batch.source, batch.positions, batch.mask)
        return logits, {layer: r.load for layer, r in routing.items()}

    def _idle_batch(self) -> PackedBatch:
        """A micro-batch that trains nothing: one padding token, no target. A data-parallel rank with fewer
        micro-batches than another runs such ones, so that every rank runs as many forwards and backwards
        (FSDP2 gathers the parameters in each, a collective)."""
        pad = self.tokenizer.pad_id
        zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        return PackedBatch([], torch.full((1, 1), pad, dtype=torch.long, device=self.device), None, None, zero,
                           zero.clone(), torch.zeros(1, 1, dtype=torch.bool, device=self.device))

    def _micro_batches(self, seqs: Sequences, active: list[int]) -> list[PackedBatch]:
        """Active completions in rows (longest first), about micro_batch_size completions per batch. A row
        holds a whole group behind its prompt when prompts are at least as long as completions on average
        (R1-Zero's template: the prompt is then computed once instead of G times); with long completions
        the block-masked rows would cost more attention than they save, so each completion gets its own."""
        by_group: dict[int, list[int]] = {}
        for i in active:
            by_group.setdefault(seqs.group[i], []).append(i)
        prompt_len = sum(len(seqs.prompts[seqs.group[i]]) for i in active) / len(active)
        completion_len = sum(len(seqs.completions[i]) for i in active) / len(active)
        grouped = list(by_group.values()) if prompt_len >= completion_len else [[i] for i in active]
        rows = sorted(grouped, key=lambda r: -sum(len(seqs.completions[i]) for i in r))
        batches, current = [], []
        for row in rows:
            current.append(row)
            if sum(map(len, current)) >= self.cfg.micro_batch_size:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        return [pack_groups(seqs, b, self.tokenizer.pad_id, self.device) for b in batches]

    def update(self, seqs: Sequences) -> dict:
        """One update on this rank's sequences. Under data parallelism the loss's normalisers are the whole
        step's (sequences, tokens and, for bnpo, micro-batches summed over the ranks) and each rank's loss is
        scaled by the number of ranks, as FSDP2 averages the gradients: the update is one process's on the
        whole batch."""
        cfg, model = self.cfg, self.model
        ranks = self.dp[1]
        # sequences with A = 0 add nothing to the loss's gradient unless a KL term pulls on them, or (bnpo) their
        # tokens count in their micro-batch's normaliser
        active = [i for i in range(len(seqs.completions))
                  if seqs.trained[i] and (cfg.beta > 0 or cfg.loss_type == "bnpo" or seqs.advantages[i] != 0)]
        batches = self._micro_batches(seqs, active) if active else []
        n_tok = sum(len(c) for c, tr in zip(seqs.completions, seqs.trained.tolist()) if tr)
        n_seq, n_tok, n_all, n_active, n_batches = map(int, self._dp_sum(
            [int(seqs.trained.sum()), n_tok, len(seqs.completions), len(active), len(batches)]))
        record = {"sequences": n_all, "trained_sequences": n_active}
        if not n_active:
            return {**record, "skipped": True, "reason": "no sequence with a learning signal"}
        real = len(batches)
        if self.mesh is not None:
            batches += [self._idle_batch()] * (self.mesh.dp_max(real) - real)
        # The reference's log-probabilities are of the same processed distribution as the policy's (TRL and verl
        # take both of logits / temperature): k3 estimates KL(pi || ref) from tokens drawn from pi, the processed
        # policy, and with ref processed alike the term is 0 at the start and measures how far the model itself
        # moved, not the gap a temperature or top-p opens between a processed policy and a raw reference.
        old, ref = {}, {}
        with torch.no_grad(), self.autocast():
            for b, batch in enumerate(batches):
                if cfg.mu > 1:
                    old[b] = token_logprobs(self._logits(model, batch)[0], batch.targets, self.sampling)
                if self.ref is not None and b < real:
                    ref[b] = token_logprobs(self._logits(self.ref, batch)[0], batch.targets, self.sampling)
        sums = {"loss": 0.0, "clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, "tokens": 0.0, "entropy": 0.0}
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr)
        for it in range(cfg.mu):
            loads: dict[int, torch.Tensor] = {}

            def losses():
                for b, batch in enumerate(batches):
                    with self.autocast():
                        logits, batch_loads = self._logits(model, batch)
                    if b >= real:  # an idle micro-batch: a backward through every parameter, of zero
                        yield logits.sum() * 0.0
                        add_load(loads, {layer: torch.zeros_like(load) for layer, load in batch_loads.items()})
                        continue
                    logp = token_logprobs(logits, batch.targets, self.sampling)
                    out = policy_loss(logp, old.get(b, logp.detach()), seqs.advantages[batch.index].to(self.device),
                                      batch.target_mask, loss_type=cfg.loss_type, eps_low=cfg.eps_low,
                                      eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref.get(b),
                                      max_tokens=cfg.max_tokens, num_sequences=n_seq, num_tokens=n_tok)
                    # bnpo's micro-batch losses are token means of their own: the batch's is their mean
                    loss = out.loss / n_batches if cfg.loss_type == "bnpo" else out.loss
                    yield loss * ranks
                    add_load(loads, batch_loads)
                    if it == cfg.mu - 1:  # statistics of the last pass
                        with torch.no_grad():
                            sums["entropy"] += float((token_entropy(logits.detach()) * batch.target_mask).sum())
                        sums["loss"] += float(loss.detach())
                        for key in ("clipped_low", "clipped_high", "kl", "tokens"):
                            sums[key] += getattr(out, key)

            grad_norm = self.apply_update(losses())
            if math.isnan(grad_norm):
                return {**record, "skipped": True, "reason": NON_FINITE, "lr": lr}
            if self.mesh is not None and loads:  # the global load: one bias update, the same on every rank
                layers = sorted(loads)
                loads = dict(zip(layers, self.mesh.dp_sum(torch.stack([loads[layer] for layer in layers]))))
            update_expert_bias(model.moe_layers(), loads, cfg.bias_update_speed)
        self._sync_engine()
        self.llm.reset_prefix_cache()  # cached prompt latents belong to the old weights
        sums = dict(zip(sums, self._dp_sum(list(sums.values()))))
        tokens = max(sums["tokens"], 1.0)
        record.update(skipped=False, lr=lr, grad_norm=grad_norm, loss=sums["loss"],
                      clip_low=sums["clipped_low"] / tokens, clip_high=sums["clipped_high"] / tokens,
                      clip_fraction=(sums["clipped_low"] + sums["clipped_high"]) / tokens,
                      entropy=sums["entropy"] / tokens)
        if self.ref is not None:
            record["kl"] = sums["kl"] / tokens
        return record

    # ---------------------------------------------------------------- the loop
    def _reward_stats(self, parts, counters: list[dict]) -> dict:
        """The step's reward statistics: `parts` the kept parts of every rank, `counters` every rank's
        counters of each task's reward functions."""
        out: dict = {}
        if not parts:
            return out
        per_fn = torch.cat([p for _, p, _ in parts])  # [B, G, F]
        totals = torch.cat([t for _, _, t in parts])
        valid = totals[~totals.isnan()]
        out["reward"] = float(valid.mean()) if valid.numel() else math.nan
        stds = [g[~g.isnan()].std() for g in totals if int((~g.isnan()).sum()) > 1]
        out["std_reward"] = float(torch.stack(stds).mean()) if stds else math.nan  # within groups
        for f, name in enumerate(self.reward_names):
            vals = per_fn[..., f][~per_fn[..., f].isnan()]
            out[f"reward_{name}"] = float(vals.mean()) if vals.numel() else math.nan
            out[f"std_reward_{name}"] = float(vals.std()) if vals.numel() > 1 else 0.0
        if "accuracy" in self.reward_names:
            out["accuracy"] = out["reward_accuracy"]
        lengths = [len(c.token_ids) for r, _, _ in parts for g in r.groups for c in g]
        truncated = [c.truncated for r, _, _ in parts for g in r.groups for c in g]
        out["completion_length"] = sum(lengths) / max(len(lengths), 1)
        out["completion_length_max"] = max(lengths, default=0)
        out["truncated"] = sum(truncated) / max(len(truncated), 1)
        for rank_counters in counters:  # summed over the ranks and the tasks that use a function
            for task_counters in rank_counters:
                for name, c in task_counters.items():
                    out[f"errors_{name}"] = out.get(f"errors_{name}", 0) + c["errors"] + c["crashes"]
                    out[f"timeouts_{name}"] = out.get(f"timeouts_{name}", 0) + c["timeouts"]
        return out

    def evaluate(self) -> dict:
        from seekforge.rl.evaluate import evaluate

        # each data-parallel rank judges its share of the problems
        result = evaluate(self.llm, self.cfg.eval_config(), shard=self.dp, gather=self._everyone)
        keep = ("accuracy", "format", "completion_tokens", "truncated", "seconds", "tokens_per_s", "n")
        return {k: result[k] for k in keep}

    def train_step(self) -> dict:
        """One step: sample and score this step's groups, then update on them; its metrics record."""
        start = time.perf_counter()
        parts, stats = self.rollout()
        # every rank's groups, rewards and rollout statistics: the advantages' batch scale and the step's metrics
        # are the whole step's
        everyone = self._everyone((parts, stats, [rewards.counters() for rewards in self.task_rewards]))
        seqs = self._sequences([p for p, _, _ in everyone])
        t_update = time.perf_counter()
        record = self.update(seqs)
        record["update_s"] = time.perf_counter() - t_update
        record.update(self._reward_stats([part for p, _, _ in everyone for part in p], [c for _, _, c in everyone]))
        stats = {key: max(s[key] for _, s, _ in everyone) if key.endswith("_s") or key == "sampling_rounds"
                 else sum(s[key] for _, s, _ in everyone) for key in stats}  # the slowest rank's times
        record.update(rollout_s=stats["rollout_s"], scoring_s=stats["scoring_s"],
                      rollout_tokens_per_s=stats["rollout_tokens"] / max(stats["rollout_s"], 1e-9),
                      zero_std_groups=stats["zero_std_groups"] / max(stats["groups_sampled"], 1),
                      groups=stats["groups_kept"], sampling_rounds=stats["sampling_rounds"],
                      step_s=time.perf_counter() - start)
        return record

    def train(self) -> dict:
        try:
            return super().train()
        finally:
            for rewards in self.task_rewards:
                rewards.close()

    def export(self) -> Path:
        from seekforge.tasks.templates import R1_ZERO_CHAT_TEMPLATE

        final = self.out / "final"
        model = gathered(self.model, self.mesh)  # None on ranks other than 0
        if model is not None:
            model.save_pretrained(final)
            if self.cfg.template == "r1_zero":  # the policy learned R1-Zero's prompt: chat and serve pose it that way
                self.tokenizer.chat_template = R1_ZERO_CHAT_TEMPLATE
            self.tokenizer.save_pretrained(final)
        barrier()
        return final


def _subset(r: Rollouts, keep: list[int]) -> Rollouts:
    return Rollouts([r.rows[i] for i in keep], [r.prompts[i] for i in keep], [r.prompt_ids[i] for i in keep],
                    [r.groups[i] for i in keep], r.seconds, r.tokens)


def run(cfg: GRPOConfig, out_dir: str | Path, resume: bool = False, report: bool = True) -> dict:
    return GRPOTrainer(cfg, out_dir, resume=resume).run(report)

"""The parallel layout of a run: one definition for training (`LoopConfig.parallel`) and the planner
(`seekforge plan`), with one set of checks and error messages.

The world is dp_replicate x dp_shard x tp x pp ranks. Expert parallelism is carved out of dp_shard, as in
torchtitan: the dp_shard ranks of one (replica, tensor, pipeline) coordinate split into dp_shard / ep groups
of ep ranks, each routed expert lives on one rank of its ep group and is sharded (FSDP) over the dp_shard / ep
ranks that hold the same experts. All dp_replicate x dp_shard ranks see different data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig

DEGREES = ("dp_replicate", "dp_shard", "tp", "ep", "pp")


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # FSDP2 sharding degree; -1: the world size left over by the other degrees
    dp_replicate: int = 1  # HSDP: replicas of the dp_shard-way sharded model
    tp: int = 1  # tensor parallelism (attention and dense MLPs)
    ep: int = 1  # expert parallelism, carved out of dp_shard (must divide it)
    pp: int = 1  # pipeline stages
    # recompute each block's activations in the backward; "selective": keep the outputs of its matmuls and
    # attention and recompute only the elementwise work between them (less memory saved, less recomputed)
    activation_checkpointing: bool | Literal["selective"] = False

    @property
    def dp(self) -> int:
        """Data-parallel ranks: those that see different data (dp_replicate x dp_shard, ep included)."""
        return self.dp_replicate * self.dp_shard

    def resolve(self, world: int, model: ModelConfig | None = None,
                world_name: str = "the world size") -> ParallelConfig:
        """The layout with dp_shard filled in, checked against `world` ranks (named `world_name` in errors) and,
        when given, the model's shapes."""
        if world < 1:
            raise ConfigError(f"{world_name} must be positive, got {world}")
        if self.activation_checkpointing not in (True, False, "selective"):
            raise ConfigError(f"parallel.activation_checkpointing must be true, false or \"selective\", got "
                              f"{self.activation_checkpointing!r}")
        for key in ("dp_replicate", "tp", "ep", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        rest = self.dp_replicate * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world % rest:
                raise ConfigError(f"parallel.dp_replicate*tp*pp = {rest} does not divide {world_name} {world}; "
                                  f"choose degrees whose product divides the world size")
            dp_shard = world // rest
        if dp_shard < 1 or dp_shard * rest != world:
            raise ConfigError(f"parallel.dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{dp_shard}*{self.tp}*"
                              f"{self.pp} = {dp_shard * rest} but {world_name} is {world}; the product must equal "
                              f"the world size (ep is carved out of dp_shard and is not a factor; "
                              f"parallel.dp_shard=-1 takes the rest)")
        if model is not None:
            if model.n_heads % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} does not divide the {model.n_heads} attention heads")
            if self.ep > 1 and model.n_routed_experts % self.ep:
                raise ConfigError(f"parallel.ep={self.ep} does not divide the {model.n_routed_experts} routed "
                                  f"experts; choose ep dividing n_routed_experts")
        if dp_shard % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide dp_shard = {dp_shard}, the ranks experts are "
                              f"spread over; raise dp_shard or lower ep")
        if model is not None and self.pp > model.n_layers + model.n_mtp_modules:
            raise ConfigError(f"parallel.pp={self.pp} exceeds the {model.n_layers + model.n_mtp_modules} blocks "
                              f"(layers + MTP modules); every stage needs one")
        return replace(self, dp_shard=dp_shard)

"""ModelConfig: every shape knob of DeepSeek-V2, V2-Lite and V3, with presets and HF config.json interop.

Field names follow DeepSeek's own inference code (dim, n_heads, n_routed_experts, ...); `to_hf_dict`
and `from_hf_dict` translate to and from transformers' names (hidden_size, num_attention_heads, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from seekforge.errors import ConfigError

ScoreFunc = Literal["sigmoid", "softmax"]
# How experts are chosen: "greedy" = plain top-k; "group_limited_greedy" (V2) = keep the groups with the
# best single expert; "noaux_tc" (V3) = keep the groups with the best top-2 sum of bias-corrected scores.
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]


@dataclass
class ModelConfig:
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944  # dense SwiGLU width (leading dense layers)
    moe_inter_dim: int = 1408  # width of one routed or shared expert
    n_layers: int = 27
    n_dense_layers: int = 1  # first_k_dense_replace
    n_heads: int = 16
    # attention (MLA)
    q_lora_rank: int = 0  # 0 = plain query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # mixture of experts
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: ScoreFunc = "softmax"
    topk_method: TopkMethod = "greedy"
    route_scale: float = 1.0
    norm_topk_prob: bool = False
    # heterogeneous expert depth (experimental, not in DeepSeek's models; 0 = off): this many routed experts
    # are two half-width SwiGLU layers with a residual instead of one SwiGLU (`seekforge.model.moe.Experts`)
    n_deep_experts: int = 0
    # rotary embedding and YaRN (rope_factor 1.0 = no YaRN)
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    max_seq_len: int = 4096
    # multi-token prediction and the rest
    n_mtp_modules: int = 0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    init_std: float = 0.02
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived shapes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (the attention temperature correction)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_factor > 1.0 and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer ids count main layers first, then MTP modules (as in the HF layout)."""
        return layer_id >= self.n_dense_layers and self.n_routed_experts > 0

    def cache_bytes_per_token(self, element_size: int) -> int:
        """Bytes the absorbed-MLA cache holds per token: latent + rotary key, every main layer."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * element_size * self.n_layers

    def full_kv_bytes_per_token(self, element_size: int) -> int:
        """What a plain per-head K/V cache of the same model would hold per token."""
        per_layer = self.n_heads * (self.qk_head_dim + self.v_head_dim)
        return per_layer * element_size * self.n_layers

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        where = f"model config {self.name!r}" if self.name else "model config"
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
        for key in ["q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts", "n_mtp_modules"]:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}: {key} must be a non-negative integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}: qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(f"{where}: n_dense_layers ({self.n_dense_layers}) exceeds n_layers ({self.n_layers})")
        if self.n_dense_layers > 0 and self.inter_dim <= 0:
            raise ConfigError(f"{where}: inter_dim must be positive when there are dense layers")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"{where}: score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"{where}: topk_method must be greedy, group_limited_greedy or noaux_tc, "
                              f"got {self.topk_method!r}")
        if self.n_routed_experts > 0:
            if self.moe_inter_dim <= 0:
                raise ConfigError(f"{where}: moe_inter_dim must be positive with routed experts")
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ConfigError(
                    f"{where}: n_activated_experts (num_experts_per_tok) is {self.n_activated_experts} but there "
                    f"are {self.n_routed_experts} routed experts; activate between 1 and {self.n_routed_experts}")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                raise ConfigError(
                    f"{where}: {self.n_routed_experts} routed experts cannot be split into {self.n_expert_groups} "
                    f"equal groups (n_group); choose n_group dividing n_routed_experts")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ConfigError(f"{where}: n_limited_groups (topk_group) must be in [1, n_expert_groups="
                                  f"{self.n_expert_groups}], got {self.n_limited_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ConfigError(
                    f"{where}: keeping {self.n_limited_groups} groups of {per_group} experts leaves fewer than the "
                    f"{self.n_activated_experts} activated experts; raise topk_group or n_group")
            if self.topk_method == "noaux_tc" and self.n_expert_groups > 1 and per_group < 2:
                raise ConfigError(f"{where}: noaux_tc scores groups by their top-2 experts; groups need >= 2 experts")
        if not isinstance(self.n_deep_experts, int) or isinstance(self.n_deep_experts, bool) or not (
                0 <= self.n_deep_experts <= self.n_routed_experts):
            raise ConfigError(f"{where}: n_deep_experts must be an integer in [0, n_routed_experts="
                              f"{self.n_routed_experts}], got {self.n_deep_experts!r}")
        if self.n_deep_experts:
            if self.n_deep_experts % self.n_expert_groups:
                raise ConfigError(f"{where}: n_deep_experts ({self.n_deep_experts}) must divide evenly over the "
                                  f"{self.n_expert_groups} expert groups (n_group); choose a multiple of it")
            if self.moe_inter_dim % 2:
                raise ConfigError(f"{where}: a deep expert splits moe_inter_dim into two layers of half its width; "
                                  f"moe_inter_dim must be even with n_deep_experts, got {self.moe_inter_dim}")
        if self.rope_factor < 1.0:
            raise ConfigError(f"{where}: rope_factor (YaRN factor) must be >= 1, got {self.rope_factor}")

    # ---------------------------------------------------------------- presets and files
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} "
                              f"or pass a checkpoint directory / config.json")
        return cls(**PRESETS[name], name=name)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "ModelConfig":
        """A preset name, a checkpoint directory holding config.json, or a config.json path."""
        path = Path(name_or_path)
        if str(name_or_path) in PRESETS and not path.exists():
            return cls.preset(str(name_or_path))
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{name_or_path}: neither a preset ({', '.join(PRESETS)}) nor a directory "
                              f"with config.json nor a config.json file")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); re-save the config") from err
        return cls.from_hf_dict(data, source=str(path))

    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        model_type = data.get("model_type")
        if model_type == DEEP_EXPERTS_MODEL_TYPE:
            if not data.get("n_deep_experts"):
                raise ConfigError(f"{source}: model_type {model_type!r} needs n_deep_experts > 0; add it or write "
                                  f"the model type of the plain model (deepseek_v3 or deepseek_v2)")
            model_type = "deepseek_v3"  # for its defaults of fields left out (seekforge writes them all)
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; seekforge reads "
                              f"{' and '.join(HF_MODEL_TYPES)} checkpoints")
        missing = [k for k in HF_REQUIRED if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        kw = {ours: data[theirs] for ours, theirs in HF_FIELDS.items() if data.get(theirs) is not None}
        kw["q_lora_rank"] = data.get("q_lora_rank") or 0
        kw["n_deep_experts"] = data.get("n_deep_experts", 0)
        defaults = HF_DEFAULTS[model_type]
        for key, value in defaults.items():
            kw.setdefault(key, value)
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if (rope.get("type") or rope.get("rope_type")) == "yarn":
            kw["rope_factor"] = float(rope["factor"])
            kw["original_seq_len"] = int(rope.get("original_max_position_embeddings", kw.get("max_seq_len", 4096)))
            kw["beta_fast"] = float(rope.get("beta_fast") or 32)
            kw["beta_slow"] = float(rope.get("beta_slow") or 1)
            kw["mscale"] = float(rope.get("mscale") or 0.0)
            kw["mscale_all_dim"] = float(rope.get("mscale_all_dim") or 0.0)
        elif rope and (rope.get("type") or rope.get("rope_type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope scaling {rope!r} is not supported (only yarn)")
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0]
        try:
            return cls(**kw, name=str(source))
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err

    def to_hf_dict(self) -> dict:
        """config.json in transformers' names. Softmax gating is written as deepseek_v2 (transformers'
        deepseek_v3 only implements sigmoid gating), sigmoid gating as deepseek_v3; a model with deep experts as
        DEEP_EXPERTS_MODEL_TYPE, which transformers refuses rather than load its tensors as a plain MoE."""
        v3 = self.score_func == "sigmoid"
        out = {theirs: getattr(self, ours) for ours, theirs in HF_FIELDS.items()}
        out.update(
            model_type="deepseek_v3" if v3 else "deepseek_v2",
            architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            q_lora_rank=self.q_lora_rank or None,
            num_key_value_heads=self.n_heads,
            hidden_act="silu",
            attention_bias=False,
            rope_theta=self.rope_theta,
            rope_interleave=True,
            torch_dtype="bfloat16",
        )
        if self.n_deep_experts:  # seekforge's own field and model type: a plain model's file stays HF's
            out.update(n_deep_experts=self.n_deep_experts, model_type=DEEP_EXPERTS_MODEL_TYPE,
                       architectures=["SeekforgeDeepExpertsForCausalLM"])
        if self.rope_factor > 1.0:
            out["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        return out

    def save(self, path: str | os.PathLike) -> None:
        text = json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


# ours -> transformers' config.json name (rope and q_lora_rank are handled apart)
HF_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group", "score_func": "scoring_func", "topk_method": "topk_method",
    "route_scale": "routed_scaling_factor", "norm_topk_prob": "norm_topk_prob",
    "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
    "n_mtp_modules": "num_nextn_predict_layers", "norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id", "init_std": "initializer_range",
}
HF_REQUIRED = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank"]
HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# config.json's model type for a model with deep experts (n_deep_experts): seekforge's own, since transformers'
# DeepSeek classes would read the same tensors as one-layer experts and compute another model without a word
DEEP_EXPERTS_MODEL_TYPE = "seekforge_deep_experts"
# What transformers assumes when a field is absent from config.json, per model type.
HF_DEFAULTS = {
    "deepseek_v3": dict(score_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, route_scale=2.5,
                        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                        n_limited_groups=4, n_dense_layers=3),
    "deepseek_v2": dict(score_func="softmax", topk_method="greedy", norm_topk_prob=False, route_scale=1.0,
                        n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
                        n_limited_groups=1, n_dense_layers=0),
}

_V2_YARN = dict(rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                mscale_all_dim=0.707, max_seq_len=163840)
PRESETS: dict[str, dict] = {
    # a few million parameters: CPU tests
    "tiny": dict(vocab_size=512, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=3, n_dense_layers=1,
                 n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                 v_head_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                 n_expert_groups=2, n_limited_groups=1, score_func="sigmoid", topk_method="noaux_tc",
                 route_scale=2.5, norm_topk_prob=True, max_seq_len=1024, n_mtp_modules=1),
    # about 100M parameters in total
    "small": dict(vocab_size=8192, dim=512, inter_dim=1536, moe_inter_dim=256, n_layers=8, n_dense_layers=1,
                  n_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
                  v_head_dim=32, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
                  n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", topk_method="noaux_tc",
                  route_scale=2.5, norm_topk_prob=True, max_seq_len=4096, n_mtp_modules=1),
    # DeepSeek-V2-Lite
    "16b": dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
                n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                v_head_dim=128, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                n_expert_groups=1, n_limited_groups=1, score_func="softmax", topk_method="greedy",
                route_scale=1.0, norm_topk_prob=False, bos_token_id=100000, eos_token_id=100001, **_V2_YARN),
    # DeepSeek-V2
    "236b": dict(vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60, n_dense_layers=1,
                 n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
                 n_expert_groups=8, n_limited_groups=3, score_func="softmax", topk_method="group_limited_greedy",
                 route_scale=16.0, norm_topk_prob=False, bos_token_id=100000, eos_token_id=100001, **_V2_YARN),
    # DeepSeek-V3 / R1
    "671b": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                 n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
                 n_expert_groups=8, n_limited_groups=4, score_func="sigmoid", topk_method="noaux_tc",
                 route_scale=2.5, norm_topk_prob=True, rope_factor=40.0, original_seq_len=4096, beta_fast=32.0,
                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, max_seq_len=163840, n_mtp_modules=1,
                 bos_token_id=0, eos_token_id=1),
}

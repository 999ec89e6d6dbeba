"""The model a trainer starts from: a shape (preset, config.json) or a checkpoint (init_from), with the run's
model_overrides applied to either.

Over a checkpoint, an override may change anything that leaves every tensor's shape as it is: YaRN context
extension (rope_factor, original_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim with a larger
max_seq_len), rope_theta, routing knobs such as route_scale. One that reshapes a tensor (dim, n_layers,
vocab_size, ...) cannot load the checkpoint's weights and is refused, naming the field.
"""

from __future__ import annotations

import torch

from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer


def model_config(model: str, init_from: str | None, overrides: dict, vocab_size: int, seq_len: int) -> ModelConfig:
    """The model a run trains: `init_from`'s config (else `model`'s) with `overrides`; a model trained from
    scratch gets the tokenizer's vocab_size unless the overrides set one. Checked against the tokenizer's
    vocab_size and the run's seq_len."""
    base = ModelConfig.load(init_from or model)
    changes = dict(overrides)
    unknown = set(changes) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"model_overrides: unknown ModelConfig field(s) {sorted(unknown)}; valid: "
                          f"{', '.join(sorted(ModelConfig.__dataclass_fields__))}")
    if not init_from and "vocab_size" not in changes:
        changes["vocab_size"] = vocab_size
    cfg = base.replace(**changes, name=str(init_from or model))
    if init_from:
        check_shapes_kept(base, cfg, changes, init_from)
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"the model's vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's "
                          f"({vocab_size}); raise vocab_size or use a tokenizer with fewer tokens")
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; raise "
                          f"model_overrides.max_seq_len (with YaRN's rope_factor to extend a trained model's "
                          f"context) or lower seq_len")
    return cfg


def build_model(cfg: ModelConfig, init_from: str | None, overrides: dict) -> Transformer:
    """A fresh model of `cfg` (initialised under the current torch seed), or init_from's weights in fp32 under
    its config.json changed by `overrides` (which `model_config` has checked)."""
    if not init_from:
        return Transformer(cfg).train()
    from seekforge.model.hf import from_pretrained

    return from_pretrained(init_from, dtype=torch.float32, changes=dict(overrides)).train()


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


def check_shapes_kept(base: ModelConfig, cfg: ModelConfig, changes: dict, init_from: str) -> None:
    """ConfigError naming each override that reshapes a tensor of the checkpoint (base) in cfg."""
    before, after = _shapes(base), _shapes(cfg)
    if before == after:
        return
    culprits = []
    for key, value in changes.items():
        if getattr(base, key) == value:
            continue
        try:
            reshapes = _shapes(base.replace(**{key: value})) != before
        except ConfigError:  # invalid on its own: part of a reshaping set of overrides
            reshapes = True
        if reshapes:
            culprits.append(key)
    culprits = culprits or sorted(k for k in changes if getattr(base, k) != changes[k])
    example = next((f"{n}: {before[n]} -> {after.get(n, 'absent')}" for n in before if before[n] != after.get(n)),
                   None) or next(f"{n}: absent -> {after[n]}" for n in after if n not in before)
    raise ConfigError(
        f"model_overrides {', '.join(culprits)} would change the shape of the weights of {init_from} ({example}): "
        f"a checkpoint loads only into its own shape. Remove {', '.join(culprits)} from model_overrides to continue "
        f"from the checkpoint (overrides that keep every shape apply, e.g. rope_factor, original_seq_len, "
        f"max_seq_len for YaRN context extension), or drop init_from to train that shape from scratch")

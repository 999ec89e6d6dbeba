"""A reward model: a DeepSeek backbone with a scalar head, read at the last token that is not padding.

The backbone is any seekforge model (its blocks and final norm; no output head, no MTP module); `score` is a
Linear(dim, 1) without bias over the final norm's output. A sequence's reward is the score at its rightmost
token that is not the pad token, transformers' rule for sequence classification, so that right- and
left-padded batches score alike (and a sequence ending with EOS, when EOS is the pad token, is read at the
token before it).

Saved in the layout of transformers' DeepseekV3ForSequenceClassification (DeepseekV2ForSequenceClassification
for softmax gating, as the language model's config is written): config.json is the language model's with
architectures [...ForSequenceClassification], one label and pad_token_id; the weights are the backbone's
model.* tensors and score.weight [1, hidden_size], no lm_head. `AutoModelForSequenceClassification` loads
it and gives the same rewards (tested).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from seekforge.errors import CheckpointError
from seekforge.model.moe import MoE, Routing
from seekforge.model.transformer import Transformer


def last_token(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index [b] of each row's rightmost token that is not `pad_id` (0 for a row of padding only)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions * (tokens != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    """`backbone` (a Transformer, whose head and MTP modules are dropped) with a scalar `score` head."""

    def __init__(self, backbone: Transformer, pad_id: int):
        super().__init__()
        backbone.head = None
        backbone.mtp = nn.ModuleList()
        backbone.cfg = backbone.cfg.replace(n_mtp_modules=0)
        self.backbone, self.cfg, self.pad_id = backbone, backbone.cfg, pad_id
        param = backbone.norm.weight
        self.score = nn.Linear(self.cfg.dim, 1, bias=False, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            nn.init.normal_(self.score.weight, 0.0, self.cfg.init_std)

    def moe_layers(self) -> dict[int, MoE]:
        return self.backbone.moe_layers()

    def rewards(self, tokens: torch.Tensor, positions=None, mask=None) -> tuple[torch.Tensor, dict[int, Routing]]:
        """tokens [b, s] -> (rewards [b], the routing of every MoE layer by layer id)."""
        h, routing = self.backbone.hidden(tokens, positions, mask)
        values = self.score(self.backbone.norm(h)).squeeze(-1).float()  # [b, s]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return values[rows, last_token(tokens, self.pad_id)], routing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] (padded with pad_id) -> rewards [b]."""
        return self.rewards(tokens)[0]

    def hf_config(self) -> dict:
        config = self.cfg.to_hf_dict()
        config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=self.pad_id)
        return config

    def save_pretrained(self, path, **kwargs) -> None:
        from seekforge.model.hf import ours_to_hf, save_pretrained

        tensors = [*ours_to_hf(self.backbone), ("score.weight", self.score.weight)]
        save_pretrained(self.backbone, path, config=self.hf_config(), tensors=tensors, **kwargs)


def is_reward_model(path) -> bool:
    """Whether the checkpoint directory holds a reward model (a sequence classifier's config.json)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except json.JSONDecodeError:
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_reward_model(path, dtype: torch.dtype = torch.float32, device=None, changes: dict | None = None,
                      pad_id: int | None = None) -> RewardModel:
    """A reward model from `path`: a saved reward model (its score head), or a language model's checkpoint as
    the backbone of a new one (score head freshly initialised under the current torch seed; `pad_id` the
    tokenizer's pad token, required then)."""
    from seekforge.model.hf import from_pretrained

    path = Path(path)
    if is_reward_model(path):
        raw = json.loads((path / "config.json").read_text())
        labels = raw.get("id2label") or {"0": "LABEL_0"}
        if len(labels) != 1 or raw.get("pad_token_id") is None:
            raise CheckpointError(f"{path}: a reward model has one label and a pad_token_id in config.json; this "
                                  f"one has {len(labels)} label(s), pad_token_id {raw.get('pad_token_id')}")
        score = torch.empty(1, raw["hidden_size"], dtype=dtype, device=device)
        backbone = from_pretrained(path, dtype=dtype, device=device, changes=changes, head=False,
                                   extra={"score.weight": score})
        model = RewardModel(backbone, int(raw["pad_token_id"]))
        with torch.no_grad():
            model.score.weight.copy_(score)
        return model
    if pad_id is None:
        raise CheckpointError(f"{path} is a language model: its reward head starts fresh and needs the tokenizer's "
                              f"pad token id")
    return RewardModel(from_pretrained(path, dtype=dtype, device=device, changes=changes, head=False), pad_id)

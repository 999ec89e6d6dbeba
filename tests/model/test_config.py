import json
import time

import pytest
import torch

from seekforge import ConfigError, ModelConfig, Transformer
from seekforge.model.config import PRESETS


def test_16b_preset_builds_on_meta_and_counts_like_transformers():
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("16b"))
    assert time.perf_counter() - start < 20
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters()["total"] == 15_706_484_224  # transformers' count for this shape


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_config(name, tmp_path):
    cfg = ModelConfig.preset(name)
    cfg.save(tmp_path / "config.json")
    back = ModelConfig.load(tmp_path)
    assert back == cfg


def test_v3_preset_matches_the_public_shape():
    cfg = ModelConfig.preset("671b")
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_dense_layers, cfg.n_routed_experts) == (129280, 7168, 61, 3, 256)
    # 70,272 bytes per token in bf16 for the absorbed cache (REFERENCE.md)
    assert cfg.cache_bytes_per_token(2) == 70_272
    assert cfg.full_kv_bytes_per_token(2) / cfg.cache_bytes_per_token(2) > 70


def test_small_preset_is_about_100m():
    with torch.device("meta"):
        total = Transformer(ModelConfig.preset("small")).num_parameters()["total"]
    assert 80e6 < total < 130e6


def test_yarn_softmax_scale_uses_mscale_all_dim():
    cfg = ModelConfig.preset("671b")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert ModelConfig.preset("tiny").softmax_scale == pytest.approx(32**-0.5)


@pytest.mark.parametrize("change, words", [
    (dict(n_activated_experts=9), "activated"),
    (dict(n_expert_groups=3), "groups"),
    (dict(n_limited_groups=5), "topk_group"),
    (dict(score_func="relu"), "score_func"),
    (dict(qk_rope_head_dim=15), "even"),
    (dict(n_dense_layers=9), "n_dense_layers"),
    (dict(dim=0), "dim"),
])
def test_inconsistent_shapes_are_rejected(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.preset("tiny").replace(**change)


def test_unknown_model_type_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="neither a preset"):
        ModelConfig.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("huge")

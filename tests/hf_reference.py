"""Random tiny checkpoints written by transformers itself: the independent reference for parity tests."""

from __future__ import annotations

import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)

CASES = {
    # name: (model_type, overrides)
    "v3_sigmoid_grouped_qlora": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    "v3_no_groups_plain_q": ("deepseek_v3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                                routed_scaling_factor=1.0)),
    "v3_yarn_two_dense": ("deepseek_v3", dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=2,
                                             num_hidden_layers=4, rope_scaling=dict(
                                                 type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
    "v3_mtp": ("deepseek_v3", dict(q_lora_rank=24, n_group=2, topk_group=2, num_nextn_predict_layers=1)),
    "v2_softmax_greedy": ("deepseek_v2", dict(q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy",
                                             routed_scaling_factor=1.0, n_shared_experts=2)),
    "v2_group_limited_yarn": ("deepseek_v2", dict(q_lora_rank=24, n_group=4, topk_group=2,
                                                  topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                                                  rope_scaling=dict(type="yarn", factor=8.0,
                                                                    original_max_position_embeddings=32,
                                                                    beta_fast=32, beta_slow=1, mscale=0.707,
                                                                    mscale_all_dim=0.707))),
}


def hf_model(case: str, seed: int = 0, **config):
    """A transformers model for `case` (`config` over its settings), randomly initialised (gate biases
    randomised too), in float32."""
    import transformers

    model_type, overrides = CASES[case]
    cls_cfg = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    cls_model = (transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3"
                 else transformers.DeepseekV2ForCausalLM)
    config = cls_cfg(**{**BASE, **overrides, **config})
    torch.manual_seed(seed)
    model = cls_model(config).float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def save_hf(case: str, path, seed: int = 0, **config):
    model = hf_model(case, seed, **config)
    model.save_pretrained(path)
    return model

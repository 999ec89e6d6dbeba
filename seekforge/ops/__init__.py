"""seekforge's ops: each computation the engine (and the model) calls through one small function, with its PyTorch
reference and, where one pays, its Triton kernel.

One file an op, holding the function, its reference and the registration of its Triton kernel (`TritonOp`):
- `mla_decode`: absorbed MLA over the paged latent cache (`paged_mla_decode`, its plan, its opaque op);
- `latents`: the cache's writes (`store_latents`, `store_new_latents`) and the latent query (`latent_query`,
  `store_and_query`);
- `gemv`: the projections of small decode steps (`FewRowLinears`, `head_matmul`, `normed_projections`) and of FP8
  weights (`fp8_linear`, `fp8_projections`; `projections`: linear layers of one input);
- `quant`: DeepSeek-V3's blockwise e4m3 quantisation (1x128 tiles, 128x128 blocks), for FP8 training and weights;
- `blockwise_mm`: FP8 GEMMs with those scales (dense: torch._scaled_mm, its layout probed; the routed experts'
  grouped one: its Triton kernel's registration), for FP8 training and weights;
- `moe`: an MoE block's routing and experts (`moe_forward`, `residual_norm`, `tokens_per_expert`);
- `argmax`: greedy decoding's argmax;
- `rng`: counter-based random draws (`uniform`, each value a function of a key, a counter, a stream and a column;
  `sequence_keys`) and sampling's exponential race over them (`exponential_race`);
- `attention`: explicit attention for prefill (`dense_attention`);
- `rotary`: the rotary embedding's rotation (`apply_rotary`).
The Triton kernels live in `seekforge.ops.triton`, whose modules import Triton and are loaded where an op runs them;
`import seekforge.ops` needs torch alone.

Which implementation runs is chosen explicitly (`dispatch.py`): `with ops.backend("torch"):`, `"triton"` or
`"auto"` (the default: Triton on CUDA); the engine's `EngineConfig.kernels` sets it around each step.

What it may import: torch, Triton (in `triton/` only), and seekforge.errors; never seekforge.model or the engine,
which sit above it. Modules it takes (an MLA, an MoE, an RMSNorm) are read by their attributes.
"""

from seekforge.ops.argmax import argmax
from seekforge.ops.attention import dense_attention, values_padded_for_sdpa
from seekforge.ops.dispatch import Backend, backend, check_device, load_triton_kernels, triton_runs_on
from seekforge.ops.gemv import (FewRowLinears, fp8_linear, fp8_projections, head_matmul, normed_projections,
                                projections)
from seekforge.ops.latents import (STORE_IN_QUERY_TOKENS, latent_query, store_and_query, store_latents,
                                   store_latents_op, store_new_latents)
from seekforge.ops.mla_decode import (PagedAttentionPlan, gather_latents, paged_mla_decode, paged_mla_decode_op,
                                      paged_mla_decode_reference, plan_paged_attention)
from seekforge.ops.moe import (FUSED_MOE_ROWS, FUSED_SHARED_TOKENS, RESIDUAL_ROUTE_TOKENS, moe_forward, residual_norm,
                               tokens_per_expert)
from seekforge.ops.rng import exponential_race, sequence_keys, uniform
from seekforge.ops.rotary import apply_rotary

__all__ = [
    "FUSED_MOE_ROWS", "FUSED_SHARED_TOKENS", "RESIDUAL_ROUTE_TOKENS", "STORE_IN_QUERY_TOKENS", "Backend",
    "FewRowLinears", "PagedAttentionPlan", "apply_rotary", "argmax", "backend", "check_device", "dense_attention",
    "exponential_race", "fp8_linear", "fp8_projections", "gather_latents", "head_matmul", "latent_query",
    "load_triton_kernels", "moe_forward", "normed_projections", "paged_mla_decode", "paged_mla_decode_op",
    "paged_mla_decode_reference", "plan_paged_attention", "projections", "residual_norm", "sequence_keys",
    "store_and_query", "store_latents", "store_latents_op", "store_new_latents", "tokens_per_expert",
    "triton_runs_on", "uniform", "values_padded_for_sdpa",
]

"""The Triton kernels of seekforge.ops, one module an op, each importing Triton at its top (no module
outside this package does).

An op in `seekforge.ops` imports its module here only where it runs Triton (`seekforge.ops.dispatch`), so CPU
installs without Triton keep to the PyTorch references, and under Triton's interpreter (TRITON_INTERPRET=1, set
before these modules are imported) the kernels run on the CPU.

- `mla_decode`: absorbed-MLA decode attention over the paged latent cache (`paged_mla_decode_triton`).
- `moe`: the routed experts of decode steps, grouped by expert in two fused kernels (`fused_experts`); at one
  or two tokens also as GEMVs, whichever form of the two timed faster for the shape, which then choose each
  pair's expert from the router's logits themselves; each token's sum over its experts with the block's
  residual added. Expert weights in x's dtype, or FP8 (e4m3 with 128x128 block scales, applied in fp32).
- `fp8_grouped`: FP8 training's routed-expert GEMMs (forward, input gradient, weight gradient; `seekforge.fp8.gemm`
  dispatches them, op "fp8_grouped"; the forward is also the engine's over FP8 expert weights): e4m3 operands in
  DeepSeek-V3's 1x128 tiles and 128x128 blocks, fp32 accumulation with each 128-wide k step's scales applied as
  it joins.
- `fp8_quant`: FP8 quantisation (op "fp8_quant"): 1x128 tiles (training's and the FP8 weights' inputs), both
  tilings of expert segments in one pass, 128x128 blocks (optionally transposed), bit-exact against
  `seekforge.ops.quant`.
- `route`: the MoE router of decode steps: logits, top-k, gate weights and load in two kernels (`route`);
  with the block's residual add and the FFN's norm in the first (`residual_route`); the first alone
  (`router_logits`, `residual_logits`) where the fused experts choose.
- `gemv`: the dense projections of steps of up to four rows (`gemv`), which the engine's captured steps
  reach through `seekforge.ops.FewRowLinears`; MLA's absorbed products (`head_gemv`); a block's input norm with
  MLA's two input projections (`norm_gemv`).
- `latents`: a decode step's new latents normalised, rotated and written into the paged cache in one launch
  (`store_new_latents_kernel`); W_UK's product with the rotary part of the query beside it, optionally with that
  store in the same launch (`latent_query_kernel`).
- `argmax`: greedy decoding's argmax over the vocabulary, a slice a program, the last to finish choosing.
- `race`: sampling's exponential race, its counter-based draws made in the kernel, chosen as the argmax chooses.
- `tuning`: the candidate tiles of the few-row kernels, timed on a shape's first launch, and the choice between a
  kernel and its library counterpart.
- `arrivals`: self-resetting counters by which the last program of a launch to finish does its final step.
- `pdl`: programmatic dependent launch on Hopper, by which each kernel of a decode step's chain starts while the
  one before it ends (the GEMVs requesting their first weight slice meanwhile).

The launches a compiled block makes are torch.library custom ops (the MLA decode's: `seekforge.ops.mla_decode`), so
torch.compile keeps a block that calls one as one graph.
"""

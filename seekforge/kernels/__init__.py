"""Triton kernels behind the PyTorch references in `seekforge.engine.kernels` and the model.

Each module imports Triton itself, so `import seekforge.kernels` stays free of it: CPU installs, which
have no Triton, keep to the references.

- `mla_decode`: absorbed-MLA decode attention over the paged latent cache (`paged_mla_decode_triton`).
- `moe`: the routed experts of decode steps, grouped by expert in two fused kernels (`fused_experts`).
"""

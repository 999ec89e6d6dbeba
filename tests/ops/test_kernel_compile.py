"""The Triton kernels compile for Hopper (sm_90) here, without a GPU: Triton's own compiler and ptxas lower
them ahead of time. The interpreter (the other kernel tests) checks what the kernels compute, not that they
lower; this catches what only the compiler refuses (mismatched types across branches, shapes a layout cannot
hold, shared memory past the limit) before a GPU run does.

The compiler runs in a child process: the interpreter, which the other kernel tests switch on for the whole
process (TRITON_INTERPRET), patches triton.language in ways the compiler trips over.
"""

import json
import os
import re
import subprocess
import sys

import pytest

MOE_TYPES = {"x_ptr": "*bf16", "w1_ptr": "*bf16", "w3_ptr": "*bf16", "s1_ptr": "*bf16", "s3_ptr": "*bf16",
             "h_ptr": "*bf16", "w2_ptr": "*bf16", "s2_ptr": "*bf16", "out_ptr": "*fp32", "gate_ptr": "*fp32",
             "ids_ptr": "*i32", "expert_ptr": "*i32", "idx_ptr": "*i64", "summed_ptr": "*bf16", "residual_ptr": "*bf16",
             "counter_ptr": "*i32", "logits_ptr": "*fp32", "bias_ptr": "*fp32", "load_ptr": "*fp32",
             "route_scale": "fp32", **{f"{w}s_ptr": "*bf16" for w in ("w1", "w2", "w3", "s1", "s2", "s3")}}
# FP8 experts: e4m3 weights, fp32 block scales (for 16-bit weights the scale pointers are unread stand-ins)
FP8_MOE_TYPES = MOE_TYPES | {f"{w}_ptr": "*fp8e4nv" for w in ("w1", "w2", "w3", "s1", "s2", "s3")} | {
    f"{w}s_ptr": "*fp32" for w in ("w1", "w2", "w3", "s1", "s2", "s3")}
MLA_INTS = ["num_heads", "num_splits", "max_tokens", "stride_qb", "stride_qs", "stride_qh", "stride_cb", "stride_ct",
            "stride_tb", "stride_tn", "stride_pb", "stride_ps", "stride_ob", "stride_os", "stride_oh", "stride_ok"]
# the GEMV's tuning candidates (seekforge.ops.triton.tuning: K_CONTIGUOUS_TILES + N_CONTIGUOUS_TILES), as numbers: the
# child process imports the kernels only under the compiler (test_the_candidates_are_the_kernels_own checks them)
GEMV_TILES = [(2, 2048, 2), (2, 1024, 2), (2, 512, 1), (2, 256, 1), (4, 256, 1), (2, 2048, 4), (4, 2048, 4),
              (4, 1024, 4), (4, 512, 4), (16, 64, 4), (16, 64, 1), (16, 64, 8), (32, 32, 2), (16, 128, 4), (32, 64, 4)]
# the e4m3 weights' candidates (tuning.FP8_TILES), likewise
FP8_GEMV_TILES = [(4, 2048, 4), (4, 2048, 2), (2, 4096, 2), (2, 2048, 2), (8, 2048, 4), (4, 4096, 4), (2, 4096, 4),
                  (8, 1024, 4), (4, 1024, 2), (4, 512, 1), (2, 1024, 1), (8, 512, 2)]
FP8_GEMV_TYPES = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16"}
# the FP8 expert GEMMs of training: their candidate tiles, (BLOCK_M, BLOCK_N, num_warps, num_stages) of
# `fp8_grouped.GROUPED_TILES` and (BLOCK_N, BLOCK_K, num_warps, num_stages) of `WEIGHT_GRADIENT_TILES`; unit strides
# are constants, as Triton specialises them
FP8_GROUPED_TILES = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
                     (128, 128, 8, 3)]
FP8_WEIGHT_GRADIENT_TILES = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (128, 128, 4, 2),
                             (128, 128, 8, 2), (64, 128, 4, 2)]
FP8_GROUPED_TYPES = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "as_ptr": "*fp32", "bs_ptr": "*fp32", "c_ptr": "*bf16",
                     "offsets_ptr": "*i32"}
FP8_QUANT_TYPES = {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "qt_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                   "st_ptr": "*fp32", "offsets_ptr": "*i32"}
# Arguments a case compiles as multiples of 16, as Triton's launcher specialises them where they are (the pointers,
# and the FP8 GEMMs' sizes and row strides at the model's shapes): what lets the loads become wide asynchronous copies.
FP8_GEMM_DIVISIBLE = {"a_ptr", "b_ptr", "c_ptr", "x_ptr", "w_ptr", "q_ptr", "qt_ptr", "s_ptr", "st_ptr", "M", "N",
                      "K", "stride_am", "stride_be", "stride_bn", "stride_bk", "stride_cm", "stride_an", "stride_bm",
                      "stride_ce", "stride_cn"}
CASES = {  # name: (module, kernel, pointer/float types (other arguments i32), constexprs, num_warps, num_stages)
    **{f"moe{kernel}_bm{bm}{'_one_block' if one else ''}{'_fp8' if fp8 else ''}": (
        "moe", kernel, FP8_MOE_TYPES if fp8 else MOE_TYPES,
        {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128, "PRECISION": "tf32", "TOPK": 8, "ONE_BLOCK": one, "FP8": fp8},
        4, 4)
       for kernel in ("_gate_up", "_down") for bm, one in ((16, True), (16, False), (64, False))
       for fp8 in (False, True)},
    **{f"moe{kernel}_tile{bn}x{bk}w{warps}{'_choose' if choose else ''}{'_fp8' if fp8 else ''}": (
        "moe", kernel, FP8_MOE_TYPES if fp8 else MOE_TYPES, {
            "TOPK": 8, "BLOCK_N": bn, "BLOCK_K": bk, "FP8": fp8,
            **({"RESIDUAL": True} if kernel == "_down_rows" else {
                "CHOOSE": choose, "BLOCK_E": 64, "SIGMOID": False, "NORMALISE": False})}, warps, 3)
       for kernel in ("_gate_up_rows", "_down_rows") for bn, bk, warps in GEMV_TILES[:9]  # K-contiguous tiles
       for choose in ((False, True) if kernel == "_gate_up_rows" else (False,)) for fp8 in (False, True)},
    # FP8's MMA tiles as `default_config` picks them (all within one 128x128 scale block)
    **{f"moe{kernel}_fp8_default_bm{bm}x{bn}x{bk}{'_one_block' if one else ''}": (
        "moe", kernel, FP8_MOE_TYPES,
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": "tf32", "TOPK": 8, "ONE_BLOCK": one, "FP8": True},
        warps, stages)
       for kernel in ("_gate_up", "_down")
       for bm, bn, bk, warps, stages, one in ((16, 32, 128, 4, 3, True), (16, 64, 128, 4, 5, False),
                                              (32, 64, 128, 4, 4, False), (64, 128, 64, 8, 3, False))},
    # the forward's layout, which the input gradient shares (it reads W's quantised transpose)
    **{f"fp8_grouped_mm_tile{bm}x{bn}w{warps}s{stages}": (
        "fp8_grouped", "_grouped_mm", FP8_GROUPED_TYPES,
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "E_BLOCK": 64, "stride_ak": 1, "stride_ask": 1, "stride_cn": 1,
         "stride_bk": 1, "stride_bsk": 1}, warps, stages)
       for bm, bn, warps, stages in FP8_GROUPED_TILES},
    **{f"fp8_grouped_weight_gradient_tile{bn}x{bk}w{warps}s{stages}": (
        "fp8_grouped", "_grouped_weight_gradient", FP8_GROUPED_TYPES | {"c_ptr": "*fp32"},
        {"BLOCK_N": bn, "BLOCK_K": bk, "stride_am": 1, "stride_ast": 1, "stride_bm": 1, "stride_bst": 1,
         "stride_ck": 1}, warps, stages)
       for bn, bk, warps, stages in FP8_WEIGHT_GRADIENT_TILES},
    "fp8_quantise_tiles": ("fp8_quant", "_quantise_tiles", FP8_QUANT_TYPES, {"BLOCK_M": 32, "stride_xk": 1}, 4, 1),
    "fp8_quantise_segments": ("fp8_quant", "_quantise_segments", FP8_QUANT_TYPES,
                              {"E_BLOCK": 64, "CHUNK": 32, "stride_xk": 1}, 8, 1),
    **{f"fp8_quantise_blocks{'_transposed' if t else ''}": (
        "fp8_quant", "_quantise_blocks", FP8_QUANT_TYPES, {"TRANSPOSED": t, "stride_wk": 1, "stride_qc": 1}, 8, 1)
       for t in (False, True)},
    "argmax": ("argmax", "_argmax", {"x_ptr": "*fp32", "best_ptr": "*fp32", "at_ptr": "*i32", "out_ptr": "*i64",
                                     "counter_ptr": "*i32"}, {"BLOCK": 4096, "SLICES": 32}, 8, 1),
    "race": ("race", "_race", {"p_ptr": "*fp32", "key_ptr": "*i64", "counter_ptr": "*i64", "best_ptr": "*fp32",
                               "at_ptr": "*i32", "out_ptr": "*i64", "arrival_ptr": "*i32"},
             {"STREAM": 2, "STREAMS": 4, "BLOCK": 4096, "SLICES": 32}, 8, 1),
    "moe_pair_sums": ("moe", "_pair_sums", MOE_TYPES, {"TOPK": 8, "BLOCK_N": 512, "RESIDUAL": True}, 4, 1),
    **{f"mla_split_rows{rows}": ("mla_decode", "_mla_decode_split",
                                 {"q_ptr": "*bf16", "cache_ptr": "*bf16", "table_ptr": "*i64", "pos_ptr": "*i64",
                                  "out_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32"},
                                 {"S": 1, "C": 512, "R": 64, "PAGE": 64, "SQ": 1, "BLOCK_H": rows, "BLOCK_C": 512,
                                  "BLOCK_R": 64, "BLOCK_N": 32 if rows == 16 else 64, "SPLIT": True, "PRECISION": "tf32"},
                                 4 if rows == 16 else 8, 2)
       for rows in (16, 64)},
    **{f"mla_combine_splits{splits}": ("mla_decode", "_mla_decode_combine",
                                       {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
                                       {"C": 512, "BLOCK_C": block_c, "ROWS": 4, "SPLITS": splits}, 4, 1)
       for splits, block_c in ((16, 64), (64, 16))},
    **{f"gemv_rows{m}_tile{bn}x{bk}w{warps}": ("gemv", "_gemv",
                                               {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"},
                                               {"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk}, warps, 3)
       for m in (1, 4) for bn, bk, warps in GEMV_TILES},
    **{f"fp8_gemv_rows{m}_tile{bn}x{bk}w{warps}": ("gemv", "_fp8_gemv", FP8_GEMV_TYPES,
                                                   {"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk}, warps, 3)
       for m in (1, 4) for bn, bk, warps in FP8_GEMV_TILES},
    **{f"fp8_norm_gemv_rows{m}_tile{bn}x{bk}w{warps}": (
        "gemv", "_fp8_norm_gemv2", {**{f"{n}_ptr": "*bf16" for n in ("x", "g", "ya", "yb")}, "wa_ptr": "*fp8e4nv",
                                    "wb_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "eps": "fp32"},
        {"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk}, warps, 3)
       for m in (1, 4) for bn, bk, warps in FP8_GEMV_TILES},
    **{f"moe{kernel}_tile{bn}x{bk}w{warps}_fp8_tiles": (
        "moe", kernel, FP8_MOE_TYPES, {
            "TOPK": 8, "BLOCK_N": bn, "BLOCK_K": bk, "FP8": True,
            **({"RESIDUAL": True} if kernel == "_down_rows" else {
                "CHOOSE": False, "BLOCK_E": 64, "SIGMOID": False, "NORMALISE": False})}, warps, 3)
       for kernel in ("_gate_up_rows", "_down_rows") for bn, bk, warps in FP8_GEMV_TILES},
    **{f"norm_gemv_rows{m}_tile{bn}x{bk}w{warps}": (
        "gemv", "_norm_gemv2", {**{f"{n}_ptr": "*bf16" for n in ("x", "g", "wa", "wb", "ya", "yb")}, "eps": "fp32"},
        {"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk}, warps, 3)
       for m in (1, 4) for bn, bk, warps in GEMV_TILES[:3]},
    **{f"latent_query_rows{m}_tile{bn}x{bk}w{warps}{'_storing' if store else ''}": (
        "latents", "_latent_query", {f"{n}_ptr": "*bf16" for n in ("x", "w", "y", "pe", "kv", "g", "cache")}
        | {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64", "eps": "fp32"},
        {"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_P": 32, "STORE": store, "BLOCK_C": 512}, warps, 3)
       for m in (1, 4) for bn, bk, warps in GEMV_TILES[9:] for store in (False, True)},
    "store_new_latents": ("latents", "_store_new_latents",
                          {"kv_ptr": "*bf16", "g_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                           "slot_ptr": "*i64", "cache_ptr": "*bf16", "eps": "fp32"},
                          {"BLOCK_C": 512, "BLOCK_P": 32}, 4, 1),
    "route_logits": ("route", "_logits",
                     {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*fp32", "load_ptr": "*fp32"},
                     {"BLOCK_E": 2, "BLOCK_K": 512}, 4, 3),
    "route_residual_logits": ("route", "_residual_logits",
                              {"h_ptr": "*bf16", "d_ptr": "*bf16", "g_ptr": "*bf16", "w_ptr": "*bf16",
                               "logits_ptr": "*fp32", "load_ptr": "*fp32", "h_out_ptr": "*bf16", "x_out_ptr": "*bf16",
                               "eps": "fp32"},
                              {"BLOCK_E": 2, "BLOCK_K": 512}, 4, 3),
    **{f"route_select_{score}": ("route", "_select",
                                 {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "weights_ptr": "*fp32",
                                  "indices_ptr": "*i64", "load_ptr": "*fp32", "route_scale": "fp32"},
                                 {"TOPK": 6, "TOPK_PAD": 8, "BLOCK_E": 64, "SIGMOID": score == "sigmoid",
                                  "NORMALISE": score == "sigmoid"}, 1, 1)
       for score in ("softmax", "sigmoid")},
}


# FP8 GEMV kernels whose global loads are counted (`test_fp8_gemvs_load_a_scale_a_chunk_not_a_weight`), each with
# the weight matrices it streams, compiled with the arguments that the launcher specialises as multiples of 16 at
# the 16b shapes (pointers, K, N, row strides), as on the GPU: the weight loads are then 16-byte vectors
FP8_LOAD_CASES = {
    "fp8_gemv_rows1_tile2x2048w2": 1, "fp8_gemv_rows4_tile4x2048w4": 1, "fp8_gemv_rows1_tile4x512w1": 1,
    "fp8_norm_gemv_rows1_tile4x2048w4": 1,
    "moe_gate_up_rows_tile4x2048w4_fp8_tiles": 2, "moe_down_rows_tile4x2048w4_fp8_tiles": 1,
    "moe_gate_up_rows_tile2x2048w2_fp8": 2,
}
GEMV_DIVISIBLE = {"N", "K", "NA", "NB", "stride_xm", "stride_wn", "stride_ym", "stride_we", "stride_se", "stride_sn",
             "stride_hm", "stride_om", "stride_wa", "stride_wb", "stride_ya", "stride_yb"}


def scalar_global_loads(ptx: str) -> int:
    """PTX global loads of one element (not .v2/.v4 vectors)."""
    ops = [line.split("ld.global", 1)[1].split()[0] for line in ptx.splitlines() if "ld.global" in line]
    return sum(".v" not in op for op in ops)


def compile_all() -> dict:
    """Child process: compile every case for sm_90; {"shared": name -> shared memory bytes, or the error,
    "async": name -> asynchronous global-to-shared copies in its Triton GPU IR, "scalar_loads": FP8_LOAD_CASES'
    name -> `scalar_global_loads` of its PTX}."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out, asyncs, loads = {}, {}, {}
    for name, (module, kernel, types, constexprs, warps, stages) in CASES.items():
        fn = getattr(importlib.import_module(f"seekforge.ops.triton.{module}"), kernel)
        if "PDL" in fn.arg_names:  # as Hopper launches them: programmatically dependent
            constexprs = {**constexprs, "PDL": True}
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
        attrs = {}
        if name in FP8_LOAD_CASES:
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n in GEMV_DIVISIBLE or signature[n].startswith("*")}
        elif module.startswith("fp8_"):
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if n in FP8_GEMM_DIVISIBLE and n not in constexprs}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages,
                                               "launch_pdl": "PDL" in constexprs})
            out[name] = compiled.metadata.shared
            asyncs[name] = compiled.asm["ttgir"].count("async_copy_global_to_local")
            if name in FP8_LOAD_CASES:
                loads[name] = scalar_global_loads(compiled.asm["ptx"])
        except Exception as err:  # noqa: BLE001 - reported to the test, which names the kernel
            out[name] = f"{type(err).__name__}: {err}"
    return {"shared": out, "async": asyncs, "scalar_loads": loads}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        if "ptxas" in proc.stderr.lower():
            pytest.skip(f"Triton cannot lower for sm_90 here: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_lowers_for_hopper(compiled, case):
    shared = compiled["shared"][case]
    assert isinstance(shared, int), f"{case} does not compile for sm_90: {shared}"
    assert shared <= 227 * 1024, f"{case} needs {shared} bytes of shared memory, past an SM's 227 KB"


@pytest.mark.parametrize("case", sorted(c for c in CASES if c.startswith("fp8_grouped")))
def test_fp8_gemms_pipeline_both_operands(compiled, case):
    """Each FP8 GEMM loads both operands through the software pipeline (asynchronous copies, num_stages - 1 ahead
    and one in the loop, each operand), which Hopper's FP8 MMA needs to run near its peak: an operand whose
    contracted dimension is not innermost (the input gradient reading W as it is) is loaded synchronously and
    transposed instead."""
    stages = CASES[case][5]
    copies = compiled["async"][case]
    assert copies >= 2 * stages, f"{case}: {copies} asynchronous copies, want 2 x {stages}"


@pytest.mark.parametrize("case", sorted(FP8_LOAD_CASES))
def test_fp8_gemvs_load_a_scale_a_chunk_not_a_weight(compiled, case):
    """The FP8 GEMVs read the weight in 16-byte vectors and one block scale for each thread's chunk of 8 columns,
    shared by the tile's rows, not one a weight or a column: over the PTX's first slice and its loop body (two
    slices' code), at most one single-element global load per 4 * block_n weights a thread streams, with room for
    a few index loads. A scale gathered per weight (one load a weight) or per column (one per block_n weights) is
    far above."""
    block_n, block_k, warps = map(int, re.search(r"tile(\d+)x(\d+)w(\d+)", case).groups())
    weights_a_thread = FP8_LOAD_CASES[case] * block_n * block_k // (32 * warps)
    assert compiled["scalar_loads"][case] <= 2 * weights_a_thread // (4 * block_n) + 16


def test_the_candidates_are_the_kernels_own():
    pytest.importorskip("triton")
    from seekforge.ops.triton.tuning import FP8_TILES, K_CONTIGUOUS_TILES, N_CONTIGUOUS_TILES

    assert [(c.block_n, c.block_k, c.num_warps) for c in K_CONTIGUOUS_TILES + N_CONTIGUOUS_TILES] == GEMV_TILES
    assert [(c.block_n, c.block_k, c.num_warps) for c in FP8_TILES] == FP8_GEMV_TILES



def test_the_fp8_grouped_tiles_are_the_kernels_own():
    pytest.importorskip("triton")
    from seekforge.ops.triton import fp8_grouped

    assert fp8_grouped.GROUPED_TILES == FP8_GROUPED_TILES
    assert fp8_grouped.WEIGHT_GRADIENT_TILES == FP8_WEIGHT_GRADIENT_TILES


if __name__ == "__main__":
    print(json.dumps(compile_all()))

"""DeepSeek-V3's blockwise FP8 training (seekforge.fp8): loss parity, and speed on a GPU; and the engine over FP8
weights (seekforge.model.fp8_weights) against the bf16 engine.

    python bench/fp8.py parity --json docs/benchmarks/fp8-parity-cpu.json   # CPU: fp32 vs simulated FP8
    python bench/fp8.py speed --config 16b --batch 2 --seq 4096 --json out.json  # one GPU: bf16 vs FP8, compiled
    python bench/fp8.py engine --config 16b --device cuda --json out.json   # one GPU: FP8 engine vs bf16 engine
    python bench/fp8.py experts --config 16b --json out.json  # one GPU: quantisation, expert GEMMs, MoE layer

parity: pretraining (seekforge's trainer, the built-in data) run twice from one seed on the same batches, once
with fp8=none and once with fp8=blockwise; reports the relative difference of the final and of the averaged late
main loss (the last quarter of the steps), V3's claim being below 0.25%, and plots both curves (a PNG next to
the JSON). On a CPU the baseline is fp32 and FP8 runs the simulated path (quantise, dequantise, fp32 matmul);
on CUDA the baseline is bf16 autocast.

speed: forward+backward tokens/s of the model in bf16 and with its blocks converted to FP8, both compiled
(as bench/train.py measures, without MTP or the optimizer step), with MFU against the bf16 matmul ceiling and
against the blockwise FP8 GEMM's ceiling, both measured in the same run.

experts: at a preset's expert shape (--tokens x the preset's top-k rows, uniform random routing), for the gate/up
shape (dim -> moe_inter) and the down shape (moe_inter -> dim): the quantisation kernels (seekforge.ops.triton.
fp8_quant) against their PyTorch references, in GB/s and as a share of the measured copy bandwidth, each gated
bit-exact; the routed experts' three grouped GEMMs (forward, input gradient, weight gradient: the FP8 Triton
kernels, seekforge.ops.triton.fp8_grouped, on operands quantised beforehand) against bf16 torch._grouped_mm, in
TFLOP/s, each gated against its dequantised operands multiplied in fp32; one FP8 expert layer's forward + backward
as the model runs it (fp8_grouped_linears, quantisation included: gate/up is w1 and w3 together, also timed one
weight at a time) against the bf16 layer's (grouped_linear a weight); and a whole MoE layer
(router, routed and shared experts, --tokens tokens) forward + backward, FP8 against bf16, its output gated
against bf16's. Eager, and with --compile also compiled. "failures" lists the gates that failed (empty: all
passed); the command exits non-zero where one did.

engine: one random model of a preset's shape (--layers cuts it) in bf16, its blocks' weights quantised to FP8
(128x128 block scales), and the bf16 model given those weights dequantised: DeepSeek's FP8 checkpoint served
dequantised, as without fp8_weights. Both run in the engine (CUDA graphs on a GPU, --compile optional); the FP8
engine's prefill and batch-64 decode multiply in FP8 (inputs quantised in 1x128 tiles; "scaled_mm_layout" null
where torch._scaled_mm takes no block scales and they dequantise instead). Reports
the FP8 engine's teacher-forced logits against the bf16 engine's (per-row relative error, max and mean, and top-1
agreement, along the bf16 engine's greedy tokens), the bytes of both models, decode tokens/s at batch 1 and 64,
prefill tokens/s, and batch 1 against each engine's own bandwidth roofline (the active weights' bytes, FP8's for
the FP8 engine, plus the cache, at the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceilings, commit, machine  # noqa: E402
from train import _measure  # noqa: E402

from seekforge.configio import atomic_write_text  # noqa: E402
from seekforge.fp8.convert import convert_to_fp8  # noqa: E402
from seekforge.ops.blockwise_mm import blockwise_mm, scaled_mm_layout  # noqa: E402
from seekforge.ops.quant import quantise_blocks, quantise_tiles  # noqa: E402
from seekforge.model.config import ModelConfig  # noqa: E402
from seekforge.model.transformer import Transformer, default_dtype  # noqa: E402
from seekforge.train.flops import training_flops_per_token  # noqa: E402

# a model whose GEMM dimensions are multiples of 128 (whole tiles, as at scale), minutes on a 2-core CPU
PARITY_MODEL = {"dim": 128, "inter_dim": 256, "moe_inter_dim": 128, "n_layers": 2, "n_heads": 2,
                "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32,
                "v_head_dim": 32}


# ---------------------------------------------------------------- loss parity
def _losses(run_dir: Path) -> list[float]:
    from seekforge.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "main_loss" in r and not r.get("skipped")]
    return [float(r["main_loss"]) for r in sorted(records, key=lambda r: r["step"])]


def parity(args) -> dict:
    from seekforge.train.pretrain import load_train_config, run

    steps = args.steps
    overrides = [f"steps={steps}", f"seq_len={args.seq}", f"batch_size={args.batch}", f"lr={args.lr}",
                 f"warmup_steps={max(1, steps // 20)}", f"constant_steps={steps // 2}",
                 f"decay_steps={steps - max(1, steps // 20) - steps // 2}", f"final_lr={args.lr / 10}",
                 f"eval_every={steps}", f"save_every={steps}", "eval_batches=1", "progress=false",
                 "tensorboard=false", f"builtin_docs={args.docs}", f"device={args.device}",
                 "model_overrides=" + json.dumps(json.loads(args.model_overrides))]
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for recipe in ("none", "blockwise"):
            cfg = load_train_config(args.config, [*overrides, f"fp8={recipe}"])
            if recipe == "none":
                from seekforge.data.corpus import build_builtin_dataset

                build_builtin_dataset(data, n_docs=cfg.builtin_docs, seed=cfg.seed, vocab_size=cfg.builtin_vocab,
                                      progress=False)
            cfg = load_train_config(args.config, [*overrides, f"fp8={recipe}", f"data={data}",
                                                  f"tokenizer={data / 'tokenizer'}"])
            start = time.perf_counter()
            run(cfg, Path(tmp) / recipe, report=False)
            curves[recipe] = {"main_loss": _losses(Path(tmp) / recipe), "seconds": time.perf_counter() - start}
            print(f"{recipe:10s} final main loss {curves[recipe]['main_loss'][-1]:.4f} "
                  f"({curves[recipe]['seconds']:.0f} s)", flush=True)
    base, fp8 = curves["none"]["main_loss"], curves["blockwise"]["main_loss"]
    late = max(1, len(base) // 4)
    result = {"bench": "fp8_parity", "config": args.config, "model_overrides": json.loads(args.model_overrides),
              "steps": steps, "seq": args.seq, "batch": args.batch, "lr": args.lr, "machine": machine(
                  torch.device(args.device if args.device != "auto" else "cpu")),
              "baseline": "fp32" if args.device == "cpu" else "bf16 autocast (precision=auto)",
              "late_steps": late, "curves": curves,
              "final_rel_diff": (fp8[-1] - base[-1]) / base[-1],
              "late_mean_rel_diff": (sum(fp8[-late:]) - sum(base[-late:])) / sum(base[-late:])}
    print(f"relative difference FP8 vs baseline: final {result['final_rel_diff']:+.3%}, "
          f"mean of the last {late} steps {result['late_mean_rel_diff']:+.3%} (V3: below 0.25%)")
    return result


def plot(result: dict, path: Path) -> Path:
    from seekforge.train.report import plot_lines

    lines = []
    for recipe, label, style in (("none", result["baseline"], "-"), ("blockwise", "FP8 blockwise", "-")):
        losses = result["curves"][recipe]["main_loss"]
        lines.append((label, list(range(len(losses))), losses, style))
    return plot_lines(path, f"main loss, {result['steps']} steps: final {result['final_rel_diff']:+.2%}, "
                             f"late mean {result['late_mean_rel_diff']:+.2%}", "main loss", lines)


# ---------------------------------------------------------------- engine (FP8 weights)
def active_weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads for one token: every parameter and buffer but the embedding, the routed experts'
    (weights and block scales) at the share of the experts a token activates."""
    cfg = model.cfg
    total = 0.0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "embed.weight" or name.startswith("rope."):
            continue
        share = cfg.n_activated_experts / cfg.n_routed_experts if ".experts.w" in name else 1.0
        total += t.numel() * t.element_size() * share
    return int(total)


def engine(args) -> dict:
    from engine import best_of, decode_rate, engine_generate

    from seekforge import LLM, SamplingParams
    from seekforge.engine.parity import forced_logits, logit_error
    from seekforge.model.fp8_weights import SCALE_SUFFIX, memory_bytes, to_fp8_weights
    from seekforge.ops.quant import dequantise_blocks

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    cfg = ModelConfig.load(args.config).replace(n_mtp_modules=0, init_std=0.05,
                                                max_seq_len=max(4096, args.prefill_len + 8))
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)

    def build() -> Transformer:  # the same random weights each call (one seed, one device)
        torch.manual_seed(0)
        with torch.device(device):
            return Transformer(cfg).to(dtype).eval()

    bf16 = build()
    fp8 = to_fp8_weights(build())  # each weight quantised as it is replaced: peak is one model and a half
    with torch.no_grad():  # the bf16 model gets the FP8 weights dequantised: the checkpoint served as today
        state = fp8.state_dict()
        for name, t in state.items():
            if name + SCALE_SUFFIX in state:
                bf16.get_parameter(name).copy_(dequantise_blocks(t, state[name + SCALE_SUFFIX], dtype))
    result = {"bench": "fp8_engine", "config": args.config, "layers": cfg.n_layers, "device": str(device),
              "machine": machine(device), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "prefill_len": args.prefill_len, "compile": args.compile,
              "memory_bytes": {"bf16": memory_bytes(bf16), "fp8": memory_bytes(fp8)},
              "active_weight_bytes": {"bf16": active_weight_bytes(bf16), "fp8": active_weight_bytes(fp8)}}
    result["memory_ratio"] = result["memory_bytes"]["fp8"] / result["memory_bytes"]["bf16"]
    if device.type == "cuda":
        result["ceilings"] = ceilings(device, dtype)
        result["scaled_mm_layout"] = scaled_mm_layout(device, True)
    result["projections"] = projection_errors(fp8, device)
    result["forward_drift"] = forward_drift(fp8, bf16, cfg.vocab_size, device)
    settings = {"max_num_seqs": max(args.batch, 8), "kv_cache_memory": int(args.kv_cache_gib * 2**30),
                "cuda_graphs": device.type == "cuda", "compile": args.compile}
    engines = {"bf16": LLM(bf16, **settings), "fp8": LLM(fp8, **settings)}

    # quality: teacher-forced along the bf16 engine's greedy tokens, decode batches of 1, 1, 2 and 4
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, cfg.vocab_size, (8, args.prompt_len), generator=gen)
    params = SamplingParams(temperature=0, max_tokens=args.gate_tokens, ignore_eos=True)
    tokens = [o.token_ids for o in engines["bf16"].generate(prompts.tolist(), params)]
    logits = {name: forced_logits(llm, prompts.tolist(), tokens, [1, 1, 2, 4]) for name, llm in engines.items()}
    error = logit_error(logits["bf16"], logits["fp8"])
    result["logits"] = {"max_rel_error": error.max().item(), "mean_rel_error": error.mean().item(),
                        "top1_agreement": (logits["bf16"].argmax(-1) == logits["fp8"].argmax(-1)).float().mean().item(),
                        "rows": error.numel()}
    print(f"FP8 vs bf16 (dequantised) logits: max rel {result['logits']['max_rel_error']:.4f}, mean rel "
          f"{result['logits']['mean_rel_error']:.4f}, top-1 {result['logits']['top1_agreement']:.3f}", flush=True)

    # speed: decode at batch 1 and --batch, prefill of one --prefill-len prompt; alternating the two engines
    for name in ("decode_batch1", f"decode_batch{args.batch}", "prefill"):
        result[name] = {}
    long = torch.randint(2, cfg.vocab_size, (1, args.prefill_len), generator=gen)
    for llm in engines.values():  # the first launch at each shape tunes the Triton kernels' tiles: not timed
        for batch in (1, args.batch):
            engine_generate(llm, prompts[:1].repeat(batch, 1), 2)
        engine_generate(llm, long, 1)
    for _ in range(args.iters):
        for name, llm in engines.items():
            def gen_fn(p, n, llm=llm):
                return engine_generate(llm, p, n)

            for batch in (1, args.batch):
                rate = decode_rate(gen_fn, prompts[:1].repeat(batch, 1), args.new_tokens, 1)
                key = f"decode_batch{batch}"
                result[key][name] = max(result[key].get(name, 0.0), rate)
            seconds = best_of(1, lambda: gen_fn(long, 1))
            result["prefill"][name] = max(result["prefill"].get(name, 0.0), args.prefill_len / seconds)
    for key in ("decode_batch1", f"decode_batch{args.batch}", "prefill"):
        result[key]["speedup"] = result[key]["fp8"] / result[key]["bf16"]
        print(f"{key:16s} bf16 {result[key]['bf16']:10.1f} tok/s  fp8 {result[key]['fp8']:10.1f} tok/s  "
              f"{result[key]['speedup']:.2f}x", flush=True)
    if device.type == "cuda":  # batch 1 against each engine's own roofline: weights and the mean context's cache
        cache = cfg.cache_bytes_per_token(2) * (args.prompt_len + args.new_tokens / 2)
        for name in engines:
            roof = result["ceilings"]["copy_bytes_per_s"] / (result["active_weight_bytes"][name] + cache)
            result["decode_batch1"][f"{name}_roofline_tokens_per_s"] = roof
            result["decode_batch1"][f"{name}_roofline_fraction"] = result["decode_batch1"][name] / roof
    return result


# ---------------------------------------------------------------- speed (GPU)
def projection_errors(model: Transformer, device: torch.device) -> dict:
    """Per shape of the FP8 projections: the layer's relative error (Frobenius) against the fp32 product of
    a bf16 x and the dequantised weight, at 1 row (the FP8 GEMV: x kept in bf16) and at 64 (the blockwise GEMM:
    x quantised in 1x128 e4m3 tiles), beside that quantisation's own error (x rounded through e4m3 and multiplied
    exactly), the floor the GEMM's error should sit at. The end-to-end logits compound these over the layers."""
    from seekforge.model.fp8_weights import FP8WeightLinear
    from seekforge.ops.quant import dequantise_blocks, dequantise_tiles

    gen = torch.Generator().manual_seed(2)
    out = {}
    with torch.no_grad():
        for module in model.modules():
            shape = f"{module.out_features}x{module.in_features}" if isinstance(module, FP8WeightLinear) else None
            if shape is None or shape in out:
                continue
            w = dequantise_blocks(module.weight, module.weight_scale_inv)
            entry = {}
            for rows, key in ((1, "gemv"), (64, "gemm")):
                x = torch.randn(rows, module.in_features, generator=gen).to(device, torch.bfloat16)
                want = x.float() @ w.t()
                entry[key] = _rel(module(x), want)
                if key == "gemm":
                    entry["e4m3_input_rounding"] = _rel(dequantise_tiles(*quantise_tiles(x.float())) @ w.t(), want)
            out[shape] = entry
            print(f"fp8_linear {shape:>12s}: rel error 1 row {entry['gemv']:.4f}, 64 rows {entry['gemm']:.4f} "
                  f"(x's e4m3 rounding alone {entry['e4m3_input_rounding']:.4f})", flush=True)
    return out


def forward_drift(fp8: Transformer, bf16: Transformer, vocab: int, device: torch.device) -> dict:
    """The FP8 model's logits against the bf16 one's (its weights dequantised), one forward of 4 tokens (every
    projection on the GEMV) and of 64 (on the blockwise GEMM, x in e4m3): relative error and top-1 agreement, to
    tell the projections' error from what the layers make of it."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    with torch.no_grad():
        for length in (4, 64):
            tokens = torch.randint(2, vocab, (1, length), generator=gen).to(device)
            got, want = fp8(tokens).float()[0], bf16(tokens).float()[0]
            out[f"tokens_{length}"] = {"rel_error": _rel(got, want),
                                       "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
            print(f"forward of {length} tokens, FP8 against bf16: rel error {out[f'tokens_{length}']['rel_error']:.4f}, "
                  f"top-1 {out[f'tokens_{length}']['top1_agreement']:.3f}", flush=True)
    return out


def fp8_matmul_flops(device: torch.device) -> float | None:
    """The blockwise FP8 GEMM (1x128 tiles times 128x128 blocks) at 8192^3, FLOP/s; None where torch._scaled_mm
    does not run it."""
    if scaled_mm_layout(device, True) is None:
        return None
    n = 8192
    a, sa = quantise_tiles(torch.randn(n, n, device=device))
    b, sb = quantise_blocks(torch.randn(n, n, device=device))
    from ceilings import _timed

    return 2 * n**3 / _timed(lambda: blockwise_mm(a, sa, b, sb, True, torch.bfloat16), device, 10)


def speed(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else "cuda")
    cfg = ModelConfig.load(args.config).replace(n_mtp_modules=0)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    flops_per_token = training_flops_per_token(cfg, args.seq)
    result = {"bench": "fp8_speed", "config": args.config, "layers": cfg.n_layers, "batch": args.batch, "seq": args.seq,
              "machine": machine(device), "ceilings": ceilings(device, torch.bfloat16),
              "fp8_matmul_flops": fp8_matmul_flops(device), "flops_per_token": flops_per_token}
    for recipe in ("none", "blockwise"):
        with torch.device(device), default_dtype(torch.bfloat16):
            model = Transformer(cfg).train()
        convert_to_fp8(model, recipe)
        if not args.eager:
            from seekforge.parallel.compile import compile_blocks

            compile_blocks(model)

        def step():
            model.loss(tokens, labels).loss.backward()
            for p in model.parameters():
                p.grad = None

        seconds = _measure(step, device, args.warmup, args.iters)
        tps = args.batch * args.seq / seconds
        entry = {"tokens_per_s": tps, "step_s": seconds,
                 "mfu_bf16_ceiling": tps * flops_per_token / result["ceilings"]["matmul_flops"]}
        if result["fp8_matmul_flops"]:
            entry["mfu_fp8_ceiling"] = tps * flops_per_token / result["fp8_matmul_flops"]
        if device.type == "cuda":
            entry["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        result[recipe] = entry
        print(f"fp8={recipe:10s} {tps:12.1f} tok/s  MFU {entry['mfu_bf16_ceiling']:.1%} of bf16's ceiling", flush=True)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["speedup"] = result["blockwise"]["tokens_per_s"] / result["none"]["tokens_per_s"]
    print(f"FP8 / bf16: {result['speedup']:.2f}x")
    return result


# ---------------------------------------------------------------- the expert GEMMs (GPU)
GEMM_GATE = 1e-2  # FP8 GEMM (bf16 output) against its dequantised operands multiplied in fp32, relative (Frobenius)
MOE_GATE = 0.15  # FP8 MoE layer's output against the bf16 layer's: two e4m3 roundings (~6%), not a wrong scale (~1)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))


def _same_bits(got, want) -> bool:
    return all(torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w) for g, w in zip(got, want))


def experts(args) -> dict:
    """The routed experts' GEMMs and quantisation ops, one expert layer and one whole MoE layer, FP8 against bf16,
    each FP8 result gated against its reference (see the module docstring)."""
    from ceilings import _timed, copy_bandwidth

    from seekforge.fp8.convert import convert_gemms
    from seekforge.fp8.gemm import fp8_grouped_linear, fp8_grouped_linears
    from seekforge.model.moe import MoE, grouped_linear
    from seekforge.ops import quant
    from seekforge.ops.blockwise_mm import GROUPED
    from seekforge.ops.quant import QUANT, dequantise_blocks, dequantise_tiles

    device = torch.device(args.device if args.device != "auto" else "cuda")
    kernel, qkernel = GROUPED.module(), QUANT.module()
    cfg = ModelConfig.load(args.config)
    n_experts, k = cfg.n_routed_experts, cfg.n_activated_experts
    gen = torch.Generator(device="cpu").manual_seed(0)
    chosen = torch.rand(args.tokens, n_experts, generator=gen).topk(k, dim=-1).indices.flatten()
    counts = torch.bincount(chosen, minlength=n_experts)
    offsets = counts.cumsum(0).to(torch.int32).to(device)
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts), counts).to(device)
    m = int(counts.sum())
    bandwidth = copy_bandwidth(device)
    result = {"bench": "fp8_experts", "config": args.config, "tokens": args.tokens, "rows": m, "experts": n_experts,
              "machine": machine(device), "copy_bytes_per_s": bandwidth, "gates": {"gemm_rel": GEMM_GATE,
                                                                                   "moe_rel": MOE_GATE},
              "shapes": {}, "failures": []}

    def seconds(fn) -> float | str:
        try:
            return _timed(fn, device, args.iters)
        except Exception as err:  # noqa: BLE001 - one failing row is reported, the others still run
            return f"{type(err).__name__}: {str(err).splitlines()[0]}"

    def gate(name: str, ok: bool, detail: str) -> None:
        print(f"  gate {name}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
        if not ok:
            result["failures"].append(f"{name}: {detail}")

    def row(fp8, bf16, work: float, unit: str) -> dict:
        """work / seconds for the FP8 and the bf16 callable; unit "TFLOP/s" or "GB/s"."""
        entry = {}
        for key, fn in (("fp8", fp8), ("bf16", bf16)):
            t = seconds(fn) if fn is not None else None
            if isinstance(t, float):
                entry[key] = work / t / (1e12 if unit == "TFLOP/s" else 1e9)
                entry[f"{key}_ms"] = t * 1e3
            elif t is not None:
                entry[key] = t
        if isinstance(entry.get("fp8"), float) and isinstance(entry.get("bf16"), float):
            entry["speedup"] = entry["bf16_ms"] / entry["fp8_ms"]
        entry["unit"] = unit
        return entry

    def show(shape: str, rows: dict) -> None:
        for name, entry in rows.items():
            print(f"{shape:8s} {name:22s} " + "  ".join(
                f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}" for key, value in entry.items()),
                flush=True)

    for name, (n_in, n_out) in {"gate_up": (cfg.dim, cfg.moe_inter_dim), "down": (cfg.moe_inter_dim, cfg.dim)}.items():
        x = torch.randn(m, n_in, device=device, dtype=torch.bfloat16)
        w = torch.randn(n_experts, n_out, n_in, device=device, dtype=torch.bfloat16) * 0.02
        dy = torch.randn(m, n_out, device=device, dtype=torch.bfloat16)
        tiles = quant.padded_tiles(m, n_experts)
        rows = {}
        # quantisation: the Triton kernel against the PyTorch reference (eager), in GB/s read + written
        xq, xs, xq_t, xs_t = qkernel.quantise_segments(x, offsets, tiles)
        dyq, dys, dyq_t, dys_t = qkernel.quantise_segments(dy, offsets, tiles)
        wq, ws = qkernel.quantise_blocks(w)
        wq_t, ws_t = qkernel.quantise_blocks(w, True)
        ends = quant.segment_ends(offsets)
        gate(f"{name} quantise_segments bit-exact", _same_bits(
            (xq, xs, xq_t, xs_t), quant.quantise_segments(x, offsets, expert_of_row)[:4]), "x vs the reference")
        gate(f"{name} quantise_blocks bit-exact", _same_bits((wq, ws, wq_t, ws_t), (
            *quant.quantise_blocks(w), *[t.contiguous() for t in quant.quantise_blocks(w.transpose(1, 2))])),
            "w and its transpose vs the reference")
        gate(f"{name} quantise_tiles bit-exact", _same_bits(qkernel.quantise_tiles(x), (xq, xs)), "x vs segments'")
        x_bytes = x.numel() * 3 + xs.numel() * 4  # bf16 read, e4m3 written
        rows["quantise_tiles"] = row(lambda: qkernel.quantise_tiles(x), lambda: quant.quantise_tiles(x), x_bytes,
                                     "GB/s")
        rows["quantise_segments"] = row(lambda: qkernel.quantise_segments(x, offsets, tiles),
                                        lambda: quant.quantise_segments(x, offsets, expert_of_row),
                                        x_bytes + xq_t.numel() + xs_t.numel() * 4, "GB/s")
        w_bytes = w.numel() * 3 + ws.numel() * 4
        rows["quantise_blocks"] = row(lambda: qkernel.quantise_blocks(w), lambda: quant.quantise_blocks(w), w_bytes,
                                      "GB/s")
        rows["quantise_blocks_t"] = row(lambda: qkernel.quantise_blocks(w, True),
                                        lambda: quant.quantise_blocks(w.transpose(1, 2)), w_bytes, "GB/s")
        for op in ("quantise_tiles", "quantise_segments", "quantise_blocks", "quantise_blocks_t"):
            if isinstance(rows[op].get("fp8"), float):
                rows[op]["fp8_of_copy_bandwidth"] = rows[op]["fp8"] * 1e9 / bandwidth
        # the GEMMs, each gated against its dequantised operands in fp32
        flops = 2 * m * n_in * n_out
        gemms = {
            "forward": (lambda: kernel.fp8_grouped_mm(xq, xs, wq, ws, offsets, torch.bfloat16),
                        lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)),
            "input_gradient": (lambda: kernel.fp8_grouped_mm(dyq, dys, wq_t, ws_t, offsets, torch.bfloat16),
                               lambda: torch._grouped_mm(dy, w, offs=offsets)),
            "weight_gradient": (
                lambda: kernel.fp8_grouped_weight_gradient(dyq_t, dys_t, xq_t, xs_t, ends, torch.bfloat16),
                lambda: torch._grouped_mm(dy.t(), x, offs=offsets)),
        }
        with torch.no_grad():
            a_dq = {"forward": dequantise_tiles(xq, xs), "input_gradient": dequantise_tiles(dyq, dys)}
            b_dq = {"forward": dequantise_blocks(wq, ws), "input_gradient": dequantise_blocks(wq_t, ws_t)}
            for gemm in ("forward", "input_gradient"):
                got = gemms[gemm][0]()
                errors = []
                for e in range(n_experts):
                    lo, hi = (int(offsets[e - 1]) if e else 0), int(offsets[e])
                    if hi > lo:
                        errors.append(_rel(got[lo:hi], a_dq[gemm][lo:hi] @ b_dq[gemm][e].t()))
                gate(f"{name} {gemm}", max(errors) < GEMM_GATE, f"max rel error over experts {max(errors):.2e}")
            del a_dq, b_dq
            got, errors = gemms["weight_gradient"][0](), []
            dy_dq, x_dq = dequantise_tiles(dyq_t, dys_t), dequantise_tiles(xq_t, xs_t)
            for e in range(n_experts):
                lo, hi = (int(ends[e - 1]) if e else 0), int(ends[e])
                if int(counts[e]):
                    errors.append(_rel(got[e], dy_dq[:, lo:hi] @ x_dq[:, lo:hi].t()))
            gate(f"{name} weight_gradient", max(errors) < GEMM_GATE, f"max rel error over experts {max(errors):.2e}")
            del got, dy_dq, x_dq
        for gemm, (fp8_fn, bf16_fn) in gemms.items():
            rows[gemm] = row(fp8_fn, bf16_fn, flops, "TFLOP/s")

        # the expert layer as the model runs it: gate/up is w1 and w3 over the same rows (FP8: one call, x quantised
        # once and, at widths of whole 128-blocks, each GEMM run once over both weights joined); down one weight
        weights = (w, torch.randn_like(w) * 0.02) if name == "gate_up" else (w,)

        def layer(fn, x=x, weights=weights, dy=dy):
            xg, wg = x.detach().requires_grad_(), [t.detach().requires_grad_() for t in weights]
            torch.autograd.backward(fn(xg, wg, offsets, expert_of_row), [dy] * len(wg))

        def one_at_a_time(fn):
            return lambda a, ws, *rest: [fn(a, t, *rest) for t in ws]

        layer_flops = 3 * flops * len(weights)
        rows["layer_eager"] = row(lambda: layer(fp8_grouped_linears), lambda: layer(one_at_a_time(grouped_linear)),
                                  layer_flops, "TFLOP/s")
        if len(weights) > 1:  # FP8 one weight at a time, x quantised and each GEMM run per weight: what joining saves
            rows["layer_eager_one_at_a_time"] = row(lambda: layer(one_at_a_time(fp8_grouped_linear)), None,
                                                    layer_flops, "TFLOP/s")
        if args.compile:
            compiled_fp8 = torch.compile(fp8_grouped_linears)
            compiled_bf16 = torch.compile(one_at_a_time(grouped_linear))
            rows["layer_compiled"] = row(lambda: layer(compiled_fp8), lambda: layer(compiled_bf16), layer_flops,
                                         "TFLOP/s")
        show(name, rows)
        result["shapes"][name] = {"in": n_in, "out": n_out, "rows": rows}
        del x, w, weights, dy, xq, xq_t, dyq, dyq_t, wq, wq_t
        torch.cuda.empty_cache()

    # one whole MoE layer (router, routed experts, shared experts), forward + backward, bf16 against FP8
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        moe = {"bf16": MoE(cfg).train()}
        moe["fp8"] = convert_gemms(MoE(cfg).train())
    with torch.no_grad():  # as Transformer.init_weights: normal(0, init_std) matrices, zero biases
        for t in [*moe["bf16"].parameters(), *moe["bf16"].buffers()]:
            t.normal_(0.0, cfg.init_std) if t.dim() > 1 else t.zero_()
    moe["fp8"].load_state_dict(moe["bf16"].state_dict())
    tokens = torch.randn(args.tokens, cfg.dim, device=device, dtype=torch.bfloat16)
    dy_moe = torch.randn_like(tokens)
    with torch.no_grad():
        out = {key: module(tokens)[0].float() for key, module in moe.items()}
    error = _rel(out["fp8"], out["bf16"])
    gate("moe layer", error < MOE_GATE, f"FP8 output vs bf16, rel error {error:.2e}")

    def moe_step(layer):
        xg = tokens.detach().requires_grad_()
        layer(xg)[0].backward(dy_moe)
        for p in layer.parameters():
            p.grad = None

    moe_flops = 3 * 2 * args.tokens * cfg.dim * cfg.moe_inter_dim * 3 * (k + cfg.n_shared_experts)
    moe_rows = {"moe_eager": row(lambda: moe_step(moe["fp8"]), lambda: moe_step(moe["bf16"]), moe_flops, "TFLOP/s")}
    if args.compile:
        compiled = {key: torch.compile(module) for key, module in moe.items()}
        moe_rows["moe_compiled"] = row(lambda: moe_step(compiled["fp8"]), lambda: moe_step(compiled["bf16"]),
                                       moe_flops, "TFLOP/s")
    show("moe", moe_rows)
    result["moe"] = {"tokens": args.tokens, "rows": moe_rows, "output_rel_error_vs_bf16": error}
    print("gates: " + ("all passed" if not result["failures"] else f"{len(result['failures'])} FAILED"), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["parity", "speed", "engine", "experts"])
    ap.add_argument("--config", default=None, help="parity: a train config (default tiny); speed, engine: a model "
                                                    "preset (default 16b)")
    ap.add_argument("--layers", type=int, default=None, help="engine, speed: override n_layers")
    ap.add_argument("--tokens", type=int, default=8192, help="experts: tokens routed (rows: tokens x top-k)")
    ap.add_argument("--prompt-len", type=int, default=128, help="engine: decode prompts' tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="engine: tokens each timed decode generates")
    ap.add_argument("--prefill-len", type=int, default=2048, help="engine: the timed prefill's prompt tokens")
    ap.add_argument("--gate-tokens", type=int, default=32, help="engine: tokens the logits are teacher-forced along")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="engine: each engine's latent cache")
    ap.add_argument("--compile", action="store_true", help="engine: torch.compile the blocks; experts: also time the "
                                                           "expert layers compiled")
    ap.add_argument("--model-overrides", default=json.dumps(PARITY_MODEL), help="parity: ModelConfig fields, JSON")
    ap.add_argument("--steps", type=int, default=200, help="parity: optimizer steps per run")
    ap.add_argument("--docs", type=int, default=3000, help="parity: built-in documents")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 (parity), 2 (speed), 64 (engine: the "
                                                         "large decode batch)")
    ap.add_argument("--seq", type=int, default=None, help="default: 64 (parity), 4096 (speed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eager", action="store_true", help="speed: without torch.compile")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="speed: timed steps; engine: rounds, best of; experts: timed "
                                                         "calls")
    ap.add_argument("--json", default=None, help="write the result here (parity: and its plot, .png)")
    args = ap.parse_args(argv)
    is_parity = args.mode == "parity"
    args.config = args.config or ("tiny" if is_parity else "16b")
    args.batch = args.batch or {"parity": 8, "speed": 2, "engine": 64, "experts": 1}[args.mode]
    args.seq = args.seq or (64 if is_parity else 4096)
    if is_parity and args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {**{"parity": parity, "speed": speed, "engine": engine, "experts": experts}[args.mode](args),
              "commit": commit(),
              "command": "python bench/fp8.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        path = Path(args.json)
        if is_parity:
            result["plot"] = plot(result, path.with_suffix(".png")).name
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("failures") else 0)

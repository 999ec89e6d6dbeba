"""Where the engine's bf16 logits part from fp32, beside transformers' in bf16: one run, one JSON.

    python bench/precision.py --device cuda --preset 16b --layers 8 --json precision.json

Random weights (as bench/engine.py makes them), saved in bf16; the reference is transformers in fp32 loaded from
that checkpoint (exact upcasts of the same weights). For a batch of prompts it measures:
- teacher-forced along the reference's own greedy tokens, for each way of computing the bf16 logits
  (transformers in one forward and decoding with its cache; seekforge's model in one forward, explicit and
  absorbed MLA; the engine eager, eager with kernels="torch", and replaying CUDA graphs, --compile'd or not):
  the mean relative error of the logits against fp32 (`seekforge.engine.parity.logit_error`), how often the
  argmax is fp32's, and the mean KL(fp32 || bf16);
- the same error layer by layer, of each block's output and of its attention's output (after wo), for
  transformers, seekforge's model and the engine decoding eagerly;
- free-running, as the issue measured it: each side's own greedy tokens judged by fp32 teacher-forced along
  them (how often its pick was fp32's argmax).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from engine import hf_forced  # noqa: E402

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge.engine.parity import forced_logits, logit_error  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402
from seekforge.model.backend import Backend  # noqa: E402


def hf_incremental(hf, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The same logits as transformers' generate computes them: the prompt, then one token a step with its cache."""
    with torch.inference_mode():
        out = hf(prompts, use_cache=True, logits_to_keep=1)
        rows, cache = [out.logits[:, -1].float()], out.past_key_values
        for t in range(tokens.shape[1] - 1):
            out = hf(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[:, -1].float())
            cache = out.past_key_values
    return torch.stack(rows, dim=1)


def model_forced(model: Transformer, prompts: torch.Tensor, tokens: torch.Tensor, absorbed: bool) -> torch.Tensor:
    ids = torch.cat([prompts, tokens[:, :-1]], dim=1)
    with torch.inference_mode():
        return model(ids, backend=Backend(absorbed))[:, -tokens.shape[1]:].float()


def summary(ref: torch.Tensor, logits: torch.Tensor) -> dict:
    err = logit_error(ref, logits)
    kl = torch.nn.functional.kl_div(logits.float().log_softmax(-1), ref.float().log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"error": err.mean().item(), "error_p90": err.flatten().quantile(0.9).item(),
            "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), "kl": kl.mean().item()}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of |a - ref| / |ref| (rows of the last dim)."""
    return ((a.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)).mean().item()


@contextmanager
def hooks(modules: dict[str, torch.nn.Module], store: dict[str, list], rows: int | None = None):
    """Records each module's output (the first of a tuple), flattened to [rows, dim]; with `rows`, only calls over
    that many rows (the engine's decode steps, not its prefill)."""
    def hook(name):
        def record(_module, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            flat = out.reshape(-1, out.shape[-1])
            if rows is None or flat.shape[0] == rows:
                store.setdefault(name, []).append(flat.float().clone())
        return record
    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_layers(hf, prompts, tokens) -> dict[str, torch.Tensor]:
    """Each decoder layer's output and its attention's (o_proj) at the T teacher-forced positions: [T, B, dim]."""
    layers = hf.model.layers
    mods = {**{f"block{i}": layer for i, layer in enumerate(layers)},
            **{f"attn{i}": layer.self_attn.o_proj for i, layer in enumerate(layers)}}
    store: dict[str, list] = {}
    with hooks(mods, store):
        hf_forced(hf, prompts, tokens)
    b, t = tokens.shape
    return {k: v[0].view(b, -1, v[0].shape[-1])[:, -t:].transpose(0, 1) for k, v in store.items()}


def layer_modules(model: Transformer) -> dict[str, torch.nn.Module]:
    """Each block, and its attention's output projection (wo), by the names the layer table uses."""
    return {**{f"block{i}": layer for i, layer in enumerate(model.layers)},
            **{f"attn{i}": layer.attn.wo for i, layer in enumerate(model.layers)}}


def model_layers(model, prompts, tokens) -> dict[str, torch.Tensor]:
    store: dict[str, list] = {}
    with hooks(layer_modules(model), store):
        model_forced(model, prompts, tokens, absorbed=False)
    b, t = tokens.shape
    return {k: v[0].view(b, -1, v[0].shape[-1])[:, -t:].transpose(0, 1) for k, v in store.items()}


def engine_layers(llm, model, prompts, tokens) -> dict[str, torch.Tensor]:
    """The engine decoding eagerly (one group): each block's output and wo's, at decode steps 1 .. T - 1 (step 0 is
    the prefill, left out): [T - 1, B, dim]."""
    store: dict[str, list] = {}
    with hooks(layer_modules(model), store, rows=tokens.shape[0]):
        forced_logits(llm, prompts.tolist(), tokens.tolist())
    return {k: torch.stack(v) for k, v in store.items()}


def layer_table(ref: dict, sides: dict[str, dict], first_step: dict[str, int]) -> dict:
    """Per layer and side: the relative error of the block's and the attention's outputs against ref's."""
    out = {}
    for name in ref:
        out[name] = {}
        for side, got in sides.items():
            r = ref[name][first_step[side]:]
            out[name][side] = rel(got[name], r)
    return out


def own_choices(hf32, prompts: torch.Tensor, chosen: torch.Tensor) -> float:
    """How often each of a side's own greedy tokens is fp32's argmax, teacher-forced along them."""
    return (hf_forced(hf32, prompts, chosen).argmax(-1) == chosen).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-graphs", action="store_true", help="skip the engine with CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="compile the engine that replays CUDA graphs")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    t0 = time.perf_counter()
    device, dtype = torch.device(args.device), torch.bfloat16
    cfg = ModelConfig.preset(args.preset).replace(n_layers=args.layers, n_mtp_modules=0, init_std=0.05,
                                                  max_seq_len=max(1024, args.prompt_len + args.new_tokens + 8))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    print(f"models ready in {time.perf_counter() - t0:.0f}s", flush=True)
    g = torch.Generator().manual_seed(1)
    b, new = args.prompts, args.new_tokens
    prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g).to(device)
    gen = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new, do_sample=False,
               pad_token_id=0)
    with torch.inference_mode():
        tokens = hf32.generate(prompts, **gen)[:, args.prompt_len:]
        hf16_own = hf16.generate(prompts, **gen)[:, args.prompt_len:]
    ref = hf_forced(hf32, prompts, tokens)
    results = {"model": f"{args.preset} with {args.layers} layers", "prompts": b, "prompt_len": args.prompt_len,
               "new_tokens": new, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__, "forced": {}, "own": {}}
    forced = results["forced"]
    forced["transformers bf16, one forward"] = summary(ref, hf_forced(hf16, prompts, tokens))
    forced["transformers bf16, decoding with its cache"] = summary(ref, hf_incremental(hf16, prompts, tokens))
    forced["seekforge model bf16, explicit MLA"] = summary(ref, model_forced(model, prompts, tokens, absorbed=False))
    forced["seekforge model bf16, absorbed MLA"] = summary(ref, model_forced(model, prompts, tokens, absorbed=True))
    results["own"]["transformers bf16"] = own_choices(hf32, prompts, hf16_own)
    print(json.dumps(forced, indent=1), flush=True)

    common = dict(max_num_seqs=b, max_model_len=cfg.max_seq_len, kv_cache_memory=2 << 30)
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm = LLM(model, **common)
    forced["engine eager"] = summary(ref, forced_logits(llm, prompts.tolist(), tokens.tolist()))
    own = torch.tensor([o.token_ids for o in llm.generate(prompts.tolist(), greedy)], device=device)
    results["own"]["engine eager"] = own_choices(hf32, prompts, own)
    layers_ref = hf_layers(hf32, prompts, tokens)
    sides = {"transformers bf16": hf_layers(hf16, prompts, tokens), "seekforge model bf16": model_layers(
        model, prompts, tokens), "engine eager": engine_layers(llm, model, prompts, tokens)}
    results["layers"] = layer_table(layers_ref, sides, {"transformers bf16": 0, "seekforge model bf16": 0,
                                                        "engine eager": 1})
    del llm
    print(json.dumps(results["layers"], indent=1), flush=True)

    llm = LLM(model, **common, kernels="torch")
    forced["engine eager, kernels=torch"] = summary(ref, forced_logits(llm, prompts.tolist(), tokens.tolist()))
    del llm
    if not args.no_graphs and device.type == "cuda":
        llm = LLM(model, **common, cuda_graphs=True, compile=args.compile)
        groups = [1, 1, 2, 4, b - 8] if b > 8 else [b]
        forced["engine graphs"] = summary(ref, forced_logits(llm, prompts.tolist(), tokens.tolist(), groups))
        forced["engine graphs, batch 1 each"] = summary(
            ref, forced_logits(llm, prompts.tolist(), tokens.tolist(), [1] * b))
        own = torch.tensor([o.token_ids for o in llm.generate(prompts.tolist(), greedy)], device=device)
        results["own"]["engine graphs"] = own_choices(hf32, prompts, own)
        del llm
    results["seconds"] = time.perf_counter() - t0
    print(json.dumps({"forced": forced, "own": results["own"]}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

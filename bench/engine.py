"""Inference engine vs transformers' `generate`, side by side on the same weights, in one run.

    python bench/engine.py                  # CPU defaults
    python bench/engine.py --device cuda --dtype bfloat16 --preset small

Measures, for both, decode tokens/s at batch 1 and 32 (prompt 128 tokens; decode rate = tokens after
the first over the time after the first), RL-style rollouts (16 prompts x 8 samples at temperature 1,
generated tokens over wall time, prefill included), prefill tokens/s (one prompt, one new token), and for the
engine alone MTP speculative decoding: a small model is trained briefly with its MTP module on
synthetic text (a sparse Markov chain), then decoding with and without drafts is timed at each --mtp-batches
batch size, both with the same --cuda-graphs / --compile (MTP's verification and drafting replay graphs too), and
the acceptance rate per draft position reported; greedy MTP outputs must equal plain decoding's (the run exits
non-zero where they do not). --mtp-only runs that part alone:

    python bench/engine.py --mtp-only --device cuda --dtype bfloat16 --cuda-graphs --compile --mtp-batches 1 8
 Each figure is the best of --repeats runs, alternating
the two implementations so that a busy machine penalises both alike.

Before any timing, the engine's logits are checked (`logit_gate`), and the run stops with a non-zero exit where
they fail: for --gate-prompts prompts, the engine's and transformers' logits along transformers' greedy tokens
are each compared with transformers' in fp32 (its weights upcast: the same model), and the engine's error must
be at most --gate-factor times transformers' (in fp32, where there is no higher precision to compare with, at
most --gate-floor). The engine steps the prompts in groups of 1, 1, 2, 4 and the rest, so each captured batch
size's kernels are checked. The JSON records the check beside the speed figures ("logit_parity"). Greedy text
identical to transformers' is printed too, as information: in bf16 with random weights near-ties in the logits
flip and the texts part within a few tokens, from either side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from ceilings import ceilings, machine  # noqa: E402

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge.engine.parity import FACTOR, forced_logits, logit_parity  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_generate(hf, prompts: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)[:, prompts.shape[1]:]


def engine_generate(llm: LLM, prompts: torch.Tensor, new: int) -> list[list[int]]:
    llm.reset_prefix_cache()  # every repeat computes its prompt from scratch
    outs = llm.generate(prompts.tolist(), SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    return [o.token_ids for o in outs]


def hf_forced(hf, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, vocab] fp32: transformers' logits for the token after each prompt and after each of tokens[:, :T - 1]
    (teacher-forced, one forward)."""
    with torch.inference_mode():
        return hf(torch.cat([prompts, tokens[:, :-1]], dim=1), logits_to_keep=tokens.shape[1]).logits.float()


def gate_reference(hf, prompts: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's tokens (transformers' greedy continuation of the prompts) and the reference logits along them:
    transformers' own in fp32, its 16-bit weights upcast in place for the forward and cast back after."""
    tokens = hf_generate(hf, prompts, new)
    params = list(hf.parameters())
    dtype = params[0].dtype
    for p in params:
        p.data = p.data.float()
    reference = hf_forced(hf, prompts, tokens)
    for p in params:
        p.data = p.data.to(dtype)
    return tokens, reference


def logit_gate(llm: LLM, hf, prompts: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor, factor: float,
               floor: float) -> dict:
    """`logit_parity` of the engine's logits (prompts stepped in groups of 1, 1, 2, 4 and the rest) and
    transformers' (none where it is the reference itself: fp32) against the reference, along `tokens`."""
    groups, left = [], prompts.shape[0]
    for n in (1, 1, 2, 4):
        if n <= left:
            groups.append(n)
            left -= n
    groups += [left] if left else []
    engine = forced_logits(llm, prompts.tolist(), tokens.tolist(), groups)
    peer = None if next(hf.parameters()).dtype == torch.float32 else hf_forced(hf, prompts, tokens)
    return {**logit_parity(reference, engine, peer, factor, floor), "groups": groups}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_rate(gen, prompts, new: int, repeats: int) -> float:
    t_first = best_of(repeats, lambda: gen(prompts, 1))
    t_all = best_of(repeats, lambda: gen(prompts, new))
    if t_all <= t_first:  # a first call that compiled or tuned kernels: no rate can be read from these two times
        raise RuntimeError(f"decode_rate: {new} tokens took {t_all:.4f} s, one took {t_first:.4f} s; warm the "
                           "engine up at these shapes before timing")
    return prompts.shape[0] * (new - 1) / (t_all - t_first)


def decode_roofline(cfg: ModelConfig, copy_bytes_per_s: float, prompt: int, new: int, elsize: int) -> dict:
    """Tokens/s at batch 1 if each step only read the active weights and the cache once, at the measured
    device copy bandwidth (bytes read + written; on the H200 it matches read-only streaming, REFERENCE.md)."""
    from seekforge.train.flops import active_matmul_params

    weight_bytes = active_matmul_params(cfg) * elsize  # the head is read; the embedding row is negligible
    cache_bytes = cfg.cache_bytes_per_token(elsize) * (prompt + new / 2)  # mean context over the generation
    return {"active_weight_bytes": weight_bytes, "cache_bytes_per_step": cache_bytes,
            "tokens_per_s": copy_bytes_per_s / (weight_bytes + cache_bytes)}


def markov_corpus(vocab: int, length: int, seed: int) -> torch.Tensor:
    """Text from a sparse Markov chain: each token has two successors, taken with probability 0.85 / 0.15."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 2), generator=g)
    out = [0]
    coins = torch.rand(length, generator=g)
    for c in coins.tolist():
        out.append(int(succ[out[-1], 0 if c < 0.85 else 1]))
    return torch.tensor(out)


def builtin_text(n_docs: int, seed: int) -> torch.Tensor:
    """The built-in corpus (`seekforge.data.corpus`: math problems and worked solutions in the R1-Zero format) as
    bytes, ids < 256: text whose next tokens are often, not always, predictable (the template and the steps' form
    are; the numbers are not)."""
    from seekforge.data.corpus import generate_documents

    return torch.tensor(list("\n".join(generate_documents(n_docs, seed)).encode()), dtype=torch.long)


def train_mtp_model(cfg: ModelConfig, steps: int, device, seed: int,
                    text: str = "markov") -> tuple[Transformer, torch.Tensor, float]:
    """A model of `cfg` trained `steps` steps with its MTP module on `text`: "markov" (`markov_corpus`) or
    "builtin" (`builtin_text`, cfg.vocab_size at least 256). Returns (the model, the corpus, the last MTP loss)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    corpus = (markov_corpus(cfg.vocab_size, 200_000, seed) if text == "markov" else builtin_text(3000, seed)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    seq, batch = 128, 16
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), device=device)
        window = corpus[starts.unsqueeze(1) + torch.arange(seq + 1, device=device)]
        out = model.loss(window[:, :-1], window[:, 1:], mtp_weight=0.3)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()
    print(f"trained {steps} steps in {time.perf_counter() - t:.1f}s: main loss {out.main_loss.item():.3f}, "
          f"MTP loss {out.mtp_loss.item():.3f}")
    return model, corpus, out.mtp_loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model shape preset (random weights)")
    ap.add_argument("--layers", type=int, default=4, help="override n_layers (CPU-friendly default)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mtp-steps", type=int, default=150, help="training steps of the MTP model (0 = skip MTP)")
    ap.add_argument("--spec-tokens", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mtp-batches", type=int, nargs="+", default=[1],
                    help="batch sizes of the MTP comparison (prompts run this many at a time)")
    ap.add_argument("--mtp-text", choices=["markov", "builtin"], default="markov",
                    help="the MTP model's training text: a sparse Markov chain (greedy drafts of it are nearly always "
                         "kept) or the built-in math corpus as bytes (acceptance well below 1)")
    ap.add_argument("--mtp-only", action="store_true",
                    help="run the MTP comparison alone (no transformers model, no logit check)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable figures on a shared machine, where a second OpenMP thread "
                         "that loses its core stalls every matmul)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs (GPU, bf16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (prefill and the captured decode step)")
    ap.add_argument("--sync", action="store_true",
                    help="turn async scheduling off (on by default on CUDA): the host settles each step before the next")
    ap.add_argument("--no-rollout", action="store_true", help="skip the RL-rollout figure")
    ap.add_argument("--gate-prompts", type=int, default=16, help="prompts of the logit check (prompt-len long)")
    ap.add_argument("--gate-tokens", type=int, default=32, help="tokens each prompt is teacher-forced along")
    ap.add_argument("--gate-factor", type=float, default=FACTOR,
                    help="the engine's error against fp32 may be this many times transformers'")
    ap.add_argument("--gate-floor", type=float, default=1e-4,
                    help="the error that passes whatever transformers' (fp32 runs: transformers is the reference)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.mtp_only:
        finish(args, device, dtype, {"device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                                     "machine": machine(device)})
        return
    cfg = ModelConfig.preset(args.preset).replace(n_layers=args.layers, n_mtp_modules=0, init_std=0.05,
                                                  max_seq_len=max(4096, args.prefill_len + 8))
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype=dtype).eval()  # on the CPU until the gate's fp32 reference is done
    results = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
               "model": f"{args.preset} with {args.layers} layers", "params": model.num_parameters(),
               "transformers": transformers.__version__, "torch": torch.__version__, "machine": machine(device),
               "cuda_graphs": args.cuda_graphs, "compile": args.compile, "async_scheduling": not args.sync}
    if device.type == "cuda":
        results["ceilings"] = ceilings(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    gate_prompts = torch.randint(2, cfg.vocab_size, (args.gate_prompts, args.prompt_len),
                                 generator=torch.Generator().manual_seed(2)).to(device)
    gate_tokens, reference = gate_reference(hf, gate_prompts, args.gate_tokens)
    model = model.to(device)
    llm = LLM(model, max_num_seqs=max(128, *args.batches), max_model_len=cfg.max_seq_len,
              max_num_batched_tokens=max(2048, args.prefill_len), cuda_graphs=args.cuda_graphs, compile=args.compile,
              async_scheduling=False if args.sync else None,
              kv_cache_memory=8 << 30 if device.type == "cuda" else None)
    gate = results["logit_parity"] = logit_gate(llm, hf, gate_prompts, gate_tokens, reference, args.gate_factor,
                                                args.gate_floor)
    del reference
    print(f"logit check, {gate['rows']} steps against transformers in fp32: engine error {gate['engine_error']:.4g}, "
          f"transformers {gate['peer_error']:.4g} (ratio {gate['ratio']:.3f}, allowed {gate['factor']}, floor "
          f"{gate['floor']}); argmax as fp32's: engine {gate['engine_argmax_agreement']:.1%}, transformers "
          f"{gate['peer_argmax_agreement']:.1%}: {'passed' if gate['passed'] else 'FAILED'}")
    if not gate["passed"]:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        sys.exit("bench/engine.py: the engine's logits failed the check against fp32; no speed figure is taken")
    print(f"model: {results['model']}, {results['params']['total'] / 1e6:.1f}M parameters "
          f"({results['params']['active'] / 1e6:.1f}M active), {args.dtype} on {device}, {results['threads']} threads")
    stats = llm.stats()
    print(f"cache: {stats['cache_bytes_per_token']} bytes/token (absorbed latent) vs "
          f"{stats['full_kv_bytes_per_token']} for a per-head K/V cache "
          f"({stats['full_kv_bytes_per_token'] / stats['cache_bytes_per_token']:.1f}x)")

    g = torch.Generator().manual_seed(1)
    rows = []
    for b in args.batches:
        prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g).to(device)
        ref = hf_generate(hf, prompts, args.new_tokens).tolist()
        ours = engine_generate(llm, prompts, args.new_tokens)
        same = sum(a == r for a, r in zip(ours, ref))
        agree = sum(common_prefix(a, r) for a, r in zip(ours, ref)) / (b * args.new_tokens)
        hf_rate, eng_rate = 0.0, 0.0
        for _ in range(args.repeats):  # alternate, keep each side's best
            hf_rate = max(hf_rate, decode_rate(lambda p, n: hf_generate(hf, p, n), prompts, args.new_tokens, 1))
            eng_rate = max(eng_rate, decode_rate(lambda p, n: engine_generate(llm, p, n), prompts, args.new_tokens, 1))
        rows.append((f"decode tok/s, batch {b}", hf_rate, eng_rate))
        print(f"batch {b}: greedy outputs identical to transformers for {same}/{b} prompts "
              f"({agree:.0%} of tokens before the first difference)")
        results[f"decode_batch{b}"] = {"transformers": hf_rate, "engine": eng_rate, "identical": f"{same}/{b}",
                                       "agreeing_prefix": agree}
        if b == 1 and "ceilings" in results:
            roof = decode_roofline(cfg, results["ceilings"]["copy_bytes_per_s"], args.prompt_len, args.new_tokens,
                                   torch.finfo(dtype).bits // 8)
            results["decode_batch1"]["roofline"] = {**roof, "engine_fraction": eng_rate / roof["tokens_per_s"]}
            print(f"batch 1: {eng_rate:.1f} tok/s = {eng_rate / roof['tokens_per_s']:.1%} of the bandwidth roofline "
                  f"({roof['tokens_per_s']:.0f} tok/s)")

    # RL rollouts: many prompts, n samples each, temperature 1 (what GRPO asks of the engine)
    if not args.no_rollout:
        prompts = torch.randint(2, cfg.vocab_size, (16, args.prompt_len), generator=g).to(device)
        n, new = 8, args.new_tokens

        def hf_rollout():
            with torch.inference_mode():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                            do_sample=True, temperature=1.0, top_k=0, num_return_sequences=n, pad_token_id=0)

        def engine_rollout():
            llm.reset_prefix_cache()
            llm.generate(prompts.tolist(), SamplingParams(temperature=1.0, max_tokens=new, n=n, ignore_eos=True))

        hf_t = eng_t = float("inf")
        for _ in range(args.repeats):
            hf_t = min(hf_t, best_of(1, hf_rollout))
            eng_t = min(eng_t, best_of(1, engine_rollout))
        total = 16 * n * new
        rows.append((f"rollout tok/s, 16 prompts x {n} samples, T=1", total / hf_t, total / eng_t))
        results["rollout"] = {"transformers": total / hf_t, "engine": total / eng_t}

    prompt = torch.randint(2, cfg.vocab_size, (1, args.prefill_len), generator=g).to(device)
    hf_generate(hf, prompt, 1), engine_generate(llm, prompt, 1)  # warm up: first-call planning at this length
    hf_t = eng_t = float("inf")
    for _ in range(args.repeats):
        hf_t = min(hf_t, best_of(1, lambda: hf_generate(hf, prompt, 1)))
        eng_t = min(eng_t, best_of(1, lambda: engine_generate(llm, prompt, 1)))
    rows.append((f"prefill tok/s, 1 x {args.prefill_len}", args.prefill_len / hf_t, args.prefill_len / eng_t))
    results["prefill"] = {"transformers": args.prefill_len / hf_t, "engine": args.prefill_len / eng_t}
    del llm, hf

    print("\n| measure | transformers generate | seekforge engine | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")

    finish(args, device, dtype, results)


def finish(args, device, dtype, results: dict) -> None:
    """The MTP part (where --mtp-steps asks for it), then the JSON; exits non-zero where the MTP gate failed."""
    passed = not args.mtp_steps or mtp_part(args, device, dtype, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not passed:
        sys.exit("bench/engine.py: greedy MTP decoding differed from plain decoding (the correctness gate)")


def mtp_part(args, device, dtype, results: dict) -> bool:
    """MTP speculative decoding on a tiny model trained --mtp-steps steps with its MTP module on --mtp-text: plain
    decoding against each --spec-tokens k, both with the same --cuda-graphs / --compile (so on a GPU MTP with
    graphs runs against plain graphs, compiled or not), at each --mtp-batches batch size; tokens/s, speedup,
    acceptance per draft position, tokens per verification step. The correctness gate: greedy MTP outputs equal
    plain greedy decoding's, token for token (returns whether every one did)."""
    mcfg = ModelConfig.preset("tiny").replace(n_mtp_modules=1, vocab_size=256, max_seq_len=1024)
    mtp_model, corpus, _ = train_mtp_model(mcfg, args.mtp_steps, device, seed=0, text=args.mtp_text)
    mtp_model = mtp_model.to(dtype)
    prompts = [corpus[i * 1000:i * 1000 + 32].tolist() for i in range(max(4, *args.mtp_batches))]
    n_new = args.new_tokens * 2
    settings = dict(max_num_seqs=max(8, *args.mtp_batches), cuda_graphs=args.cuda_graphs, compile=args.compile,
                    async_scheduling=False if args.sync else None)
    print(f"\nMTP speculative decoding (tiny model trained {args.mtp_steps} steps on {args.mtp_text} text), "
          f"{n_new} new tokens x {len(prompts)} prompts, cuda_graphs={args.cuda_graphs}, compile={args.compile}")
    print("| decoding | batch | drafts | tok/s | speedup | acceptance per draft position | tokens per step | "
          "identical to plain |\n|---|---|---|---|---|---|---|---|")
    results["mtp"], passed = {"cuda_graphs": args.cuda_graphs, "compile": args.compile}, True
    plain_llm = LLM(mtp_model, **settings)
    spec_llms = {k: LLM(mtp_model, num_speculative_tokens=k, **settings) for k in args.spec_tokens}
    for mode, params in (("greedy", SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)),
                         ("T=1", SamplingParams(temperature=1.0, max_tokens=n_new, ignore_eos=True, seed=0))):
        base_out = [o.token_ids for o in plain_llm.generate(prompts, params)]
        same = {k: [o.token_ids for o in sl.generate(prompts, params)] == base_out for k, sl in spec_llms.items()}
        passed &= mode != "greedy" or all(same.values())
        for b in args.mtp_batches:
            def timed(llm_):
                def run():
                    llm_.reset_prefix_cache()
                    for i in range(0, len(prompts), b):  # b prompts at a time
                        llm_.generate(prompts[i:i + b], params)
                return best_of(args.repeats, run)

            t_plain = timed(plain_llm)
            n_tokens = len(prompts) * n_new
            print(f"| {mode} | {b} | 0 (plain) | {n_tokens / t_plain:,.0f} | 1.00x | - | 1 | - |")
            row = results["mtp"].setdefault(mode, {})[f"batch{b}"] = {"plain_tok_s": n_tokens / t_plain}
            for k, sl in spec_llms.items():
                sl.proposer.stats = type(sl.proposer.stats).empty(k)
                t = timed(sl)
                st = sl.proposer.stats
                acc = ", ".join(f"{a:.2f}" for a in st.acceptance_rate)
                shown = same[k] if mode == "greedy" else "n/a (sampled)"
                print(f"| {mode} | {b} | {k} | {n_tokens / t:,.0f} | {t_plain / t:.2f}x | {acc} | "
                      f"{st.mean_tokens_per_step:.2f} | {shown} |")
                row[f"k{k}"] = {"tok_s": n_tokens / t, "speedup": t_plain / t, "identical": same[k], **st.as_dict()}
    results["mtp"]["gate_passed"] = passed
    return passed


if __name__ == "__main__":
    main()

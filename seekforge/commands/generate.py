"""`seekforge generate PATH --prompt TEXT`: complete prompts with the inference engine.

Prompts are text (needs tokenizer.json beside the checkpoint; encoded as transformers' AutoTokenizer
encodes it, BOS first where the checkpoint's tokenizer adds one) or token ids (--token-ids "1 2 3").
Prints each completion's text (or token ids without a tokenizer); --json prints one JSON object per
completion; --stream prints a single completion as it is generated. --dual-chain runs the rule chain
beside the model (seekforge.dual_chain) and prints its decision after each prompt's completions (in
the JSON: "dual_chain"). The engine, sampling and dual-chain flags are shared with `seekforge chat`.
"""

from __future__ import annotations

import json
import sys


def add_engine_args(p) -> None:
    p.add_argument("path", help="checkpoint directory (config.json + safetensors, tokenizer.json optional)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--fp8-weights", action="store_true",
                   help="keep the blocks' weights in FP8 with 128x128 block scales (about half of bf16's memory): an "
                        "FP8 checkpoint's as they are, a 16-bit one's quantised on load (default: FP8 dequantised); "
                        "on CUDA, steps of more than a few tokens quantise the inputs in 1x128 tiles for FP8 GEMMs, "
                        "as DeepSeek's own inference does")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="draft this many tokens per step with the checkpoint's MTP module (0 = off)")


def add_sampling_args(p, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=top_p)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")


def add_dual_chain_args(p) -> None:
    g = p.add_argument_group("dual chain (an exact rule chain beside the model; docs/DUAL_CHAIN.md)")
    g.add_argument("--dual-chain", action="store_true",
                   help="compute expressions the model writes (\"3 * 4 =\", <calc>..</calc>) exactly inside the "
                        "generation, and answer with the rule chain's solvers (arithmetic, algebra, units, a "
                        "table) where the model's confidence is below --threshold or a solver is certain and "
                        "disagrees")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="with --dual-chain: the model's confidence in its answer (0..1, from its logprobs over the "
                        "answer and agreement across --n samples) below which the rule chain answers (default 0.5)")
    g.add_argument("--rule-table", default=None, metavar="FILE",
                   help="with --dual-chain: a CSV or JSON table the rule chain looks answers up in (the first "
                        "column names the rows)")


def dual_chain_from_args(args):
    """The DualChain the flags ask for, or None without --dual-chain."""
    from seekforge.errors import ConfigError

    if not args.dual_chain:
        if args.rule_table is not None:
            raise ConfigError("--rule-table is read by the rule chain: add --dual-chain")
        return None
    from seekforge.dual_chain import DualChain, RuleChain, TableSolver, default_solvers

    solvers = default_solvers() + ([TableSolver.from_file(args.rule_table)] if args.rule_table else [])
    return DualChain(RuleChain(solvers), threshold=args.threshold)


def sampling_from_args(args, **extra):
    from seekforge.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                          stop_token_ids=args.stop_token_id, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                          ignore_eos=args.ignore_eos, **extra)


def engine_from_args(args):
    from seekforge.engine import LLM

    return LLM(args.path, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               num_speculative_tokens=args.speculative_tokens, weights_dtype="fp8" if args.fp8_weights else None)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete prompts with the inference engine")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--token-ids", action="append", default=[], help='a prompt as token ids, "1 2 3" (repeatable)')
    p.add_argument("--chat", action="store_true", help="wrap each text prompt as a user turn of the chat template")
    p.add_argument("--thinking", action="store_true", help="with --chat: open the answer with <think>")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--logprobs", type=int, default=None, help="report each token's logprob and the top K")
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument("--stream", action="store_true", help="print a single completion as it is generated")
    add_sampling_args(p)
    add_dual_chain_args(p)
    p.set_defaults(func=run)


def _parse_ids(text: str) -> list[int]:
    from seekforge.errors import ConfigError

    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--token-ids {text!r}: give integers separated by spaces or commas") from None


def run(args) -> int:
    from seekforge.errors import ConfigError

    if not args.prompt and not args.token_ids:
        raise ConfigError("nothing to generate: pass --prompt TEXT or --token-ids \"1 2 3\"")
    params = sampling_from_args(args, n=args.n, logprobs=args.logprobs)
    dual = dual_chain_from_args(args)
    llm = engine_from_args(args)
    if args.chat and llm.tokenizer is None:
        raise ConfigError("--chat needs a tokenizer (tokenizer.json beside the checkpoint)")
    # a chat is encoded as transformers encodes a rendered chat: the template wrote BOS where it wants one
    prompts: list = [llm.tokenizer.encode_chat([{"role": "user", "content": text}], thinking=args.thinking)
                     if args.chat else text for text in args.prompt]
    prompts += [_parse_ids(t) for t in args.token_ids]
    if args.stream:
        if len(prompts) != 1 or args.n != 1:
            raise ConfigError("--stream prints one completion: give one prompt and --n 1")
        if dual is not None:
            raise ConfigError("--dual-chain decides on whole completions: leave out --stream")
        for out in llm.stream(prompts, params):
            c = out.outputs[0]
            sys.stdout.write(c.delta_text if c.text is not None else "".join(f" {t}" for t in c.delta_token_ids))
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, out in enumerate(llm.generate(prompts, params, dual_chain=dual)):
        decision = out.dual_chain.as_dict() if out.dual_chain is not None else None
        for c in out.outputs:
            if args.json:
                record = {"prompt": i, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason}
                if decision is not None:
                    record["dual_chain"] = decision
                if c.logprobs is not None:
                    record["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                                           "top": {str(k): v for k, v in lp.top.items()}} for lp in c.logprobs]
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(c.text if c.text is not None else " ".join(map(str, c.token_ids)))
        if decision is not None and not args.json:
            print(describe_decision(out.dual_chain))
    return 0


def describe_decision(decision) -> str:
    """One line saying which chain answered, with the model's confidence and the solver's derivation."""
    rule = decision.rule
    line = (f"[dual chain] answer: {decision.answer} (from the {decision.chain} chain; model's answer "
            f"{decision.model_answer}, confidence {decision.confidence:.3f}, threshold {decision.threshold:g})")
    return line + (f"; {rule.solver}: {rule.derivation}" if rule is not None else "; no solver applies")

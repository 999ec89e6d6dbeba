"""GRPO end to end on a tiny random model: rollouts on the engine, updates, checkpoints, exact resume,
reward functions that raise or hang, dynamic sampling, KL, mu > 1, and the CLI."""

import json
from pathlib import Path

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.model.moe import MoE
from seekforge.tasks import get_task, r1_zero_prompt
from seekforge.tokenizer import Tokenizer
from seekforge.rl import grpo
from seekforge.rl.grpo import GRPOTrainer, Sequences, load_grpo_config, pack_groups
from seekforge.rl.loss import token_logprobs
from seekforge.train.loop import TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")

REWARDS_FILE = '''
import os, time

def digits(prompt, completion, **kw):
    """A dense signal a random model can climb: the share of digits in the completion."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)

def boom(prompt, completion, **kw):
    raise RuntimeError("this reward always fails")

def sleepy(prompt, completion, **kw):
    flag = os.environ["SLEEPY_FLAG"]
    if not os.path.exists(flag):  # hang once (the worker is killed and replaced), then answer at once
        open(flag, "w").close()
        time.sleep(30)
    return 0.0
'''


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    """The shared tiny MoE + MLA + MTP checkpoint, its tokenizer trained on the task's text."""
    return tiny_checkpoint()


def _config(base, tmp_path, *extra):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS_FILE)
    return load_grpo_config(None, [
        f"init_from={base}", "task=chain_sum", "steps=4", "prompts_per_step=2", "group_size=4", "max_tokens=12",
        "lr=1e-3", "mask_truncated=false", "eval_every=100", "eval_n=4", "save_every=1", "micro_batch_size=4",
        f"rewards=[accuracy, format, {rewards}:digits]", "progress=false", "tensorboard=false", *extra])


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_checkpoints_and_resumes_exactly(base, tmp_path):
    cfg = _config(base, tmp_path)
    full = GRPOTrainer(cfg, tmp_path / "full")
    full.train()
    want = _records(tmp_path / "full")

    # the same run, interrupted after two updates, then resumed
    first = GRPOTrainer(cfg, tmp_path / "cut")
    real_update, calls = first.update, []

    def update_then_stop(seqs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_update(seqs)

    first.update = update_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = GRPOTrainer(cfg, tmp_path / "cut", resume=True)
    assert resumed.step == 2
    resumed.train()
    got = _records(tmp_path / "cut")

    def view(records):
        keys = ("reward", "reward_digits", "loss", "completion_length", "grad_norm")
        return [(r["step"], r.get("kind", "train"), *(r.get(k) for k in keys)) for r in records]

    assert view(got) == view(want)  # rollouts, rewards and updates repeat exactly across the resume
    steps = [r["step"] for r in want]
    assert steps == [0, 1, 2, 3, 4, 4] and want[0]["kind"] == "eval" and want[-1]["kind"] == "eval"
    trained = [r for r in want if r.get("kind") != "eval"]
    assert all(not r["skipped"] for r in trained), trained
    for key in ("reward", "std_reward", "reward_accuracy", "std_reward_format", "reward_format", "reward_digits", "accuracy",
                "zero_std_groups", "completion_length", "clip_fraction", "entropy", "rollout_tokens_per_s",
                "rollout_s", "update_s", "grad_norm"):
        assert key in trained[-1], key
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_reward_that_raises_or_hangs_does_not_stop_training(base, tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEPY_FLAG", str(tmp_path / "slept"))
    rewards = tmp_path / "my_rewards.py"
    cfg = _config(base, tmp_path, "steps=2", "reward_timeout_s=1",
                  f"rewards=[accuracy, {rewards}:digits, {rewards}:boom, {rewards}:sleepy]")
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    trainer.train()
    last = [r for r in _records(tmp_path / "run") if r.get("kind") != "eval"][-1]
    assert last["step"] == 2 and not last["skipped"]
    assert last["errors_boom"] == 2 * 2 * 4  # every call of both steps failed, and was counted
    assert last["timeouts_sleepy"] == 1


def test_non_finite_updates_are_skipped_then_training_stops(base, tmp_path, monkeypatch):
    """The training loop's guard, as in pretraining: a non-finite update is skipped and never checkpointed, and
    max_bad_steps of them in a row stop the run with the last good checkpoint intact."""
    cfg = _config(base, tmp_path, "steps=6", "max_bad_steps=2")
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    real_loss, calls = grpo.policy_loss, []

    def nan_after_the_first_update(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(trainer.step)
        if trainer.step >= 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(grpo, "policy_loss", nan_after_the_first_update)
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        trainer.train()
    trained = [r for r in _records(tmp_path / "run") if r.get("kind") != "eval"]
    assert [(r["step"], r["skipped"]) for r in trained] == [(1, False), (2, True), (3, True)]
    assert trainer.ckpt.load_latest()[0] == 1


def test_dynamic_sampling_kl_and_several_inner_iterations(base, tmp_path):
    cfg = _config(base, tmp_path, "steps=2", "dynamic_sampling=true", "max_sampling_rounds=3", "loss_type=dapo",
                  "eps_high=0.28", "beta=0.01", "mu=2", "scale_rewards=batch")
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    trainer.train()
    trained = [r for r in _records(tmp_path / "run") if r.get("kind") != "eval"]
    assert all(not r["skipped"] and r["kl"] >= 0 for r in trained)
    assert all(r["sampling_rounds"] >= 1 and r["groups"] <= 2 for r in trained)
    assert trained[-1]["kl"] > 0  # two updates moved the policy away from the reference
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_bias_updates_move_the_layers_that_ran_on_a_model_with_mtp(base, tmp_path):
    """The policy's forward runs the main layers only: with bias_update_speed > 0 the update moves their gate
    bias and leaves the MTP block's as it was."""
    cfg = _config(base, tmp_path, "steps=1", "bias_update_speed=0.01", "save_every=100")
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    model = trainer.model
    assert model.cfg.n_mtp_modules
    gates = {b.layer_id: b.ffn.gate for b in [*model.layers, *(m.block for m in model.mtp)] if isinstance(b.ffn, MoE)}
    before = {layer: gate.bias.clone() for layer, gate in gates.items()}
    trainer.train()
    assert not [r for r in _records(tmp_path / "run") if r.get("kind") != "eval"][-1]["skipped"]
    moved = {layer for layer, gate in gates.items() if not torch.equal(gate.bias, before[layer])}
    assert moved == {b.layer_id for b in model.layers if isinstance(b.ffn, MoE)}


def test_bad_configs_are_refused(base, tmp_path, monkeypatch):
    import seekforge.engine

    with pytest.raises(ConfigError, match="group_size"):
        _config(base, tmp_path, "group_size=1")
    with pytest.raises(ConfigError, match="loss_type"):
        _config(base, tmp_path, "loss_type=ppo")
    for bad in ("top_p=0", "top_p=1.5", "top_k=-1"):
        with pytest.raises(ConfigError, match="top_p"):
            _config(base, tmp_path, bad)
    for bad in ("engine.gpu_memory_utilization=0", "engine.gpu_memory_utilization=1.5"):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            _config(base, tmp_path, bad)
    # the engine section is checked key by key, like the rest of the config
    with pytest.raises(ConfigError, match="unknown key 'engine.max_num_seq'.*did you mean 'engine.max_num_seqs'"):
        _config(base, tmp_path, "engine.max_num_seq=8")
    with pytest.raises(ConfigError, match="engine.*max_waiting"):
        _config(base, tmp_path, "engine={max_waiting: 0}")
    # the rollout engine gets GRPO's cache share (0.4) and a whole step's sequences unless engine settings say otherwise
    engines = []

    class LLM(seekforge.engine.LLM):
        def __init__(self, model, config, **kwargs):
            super().__init__(model, config, **kwargs)
            engines.append((config, self))

    monkeypatch.setattr(seekforge.engine, "LLM", LLM)
    GRPOTrainer(_config(base, tmp_path), tmp_path / "default")
    GRPOTrainer(_config(base, tmp_path, "engine.gpu_memory_utilization=0.25"), tmp_path / "share")
    GRPOTrainer(_config(base, tmp_path, "engine={kv_cache_memory: 4000000}", "engine.max_num_seqs=3"),
                tmp_path / "bytes")
    (default, _), (share, _), (sized, llm) = engines
    assert default.gpu_memory_utilization == 0.4 and default.max_num_seqs == 256
    assert share.gpu_memory_utilization == 0.25 and sized.kv_cache_memory == 4_000_000
    assert llm.scheduler.max_num_seqs == 3
    cfg = _config(base, tmp_path, "steps=1")
    GRPOTrainer(cfg, tmp_path / "run").train()
    with pytest.raises(ConfigError, match="--resume"):
        GRPOTrainer(cfg, tmp_path / "run")


def test_cli_grpo_then_eval(base, tmp_path, capsys, monkeypatch):
    import seekforge.rl.grpo as grpo
    from seekforge.cli import main

    rollouts = []
    real_generate = grpo.generate
    monkeypatch.setattr(grpo, "generate", lambda *a, **kw: rollouts.append(real_generate(*a, **kw)) or rollouts[-1])
    out = tmp_path / "cli"
    assert main(["grpo", "--from", str(base), "--task", "chain_sum", "--out", str(out), "steps=1", "prompts_per_step=2",
                 "group_size=2", "max_tokens=8", "eval_n=2", "progress=false", "tensorboard=false"]) == 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    # The saved chat template poses a question as the trainer did: chat and serve render what RL trained on.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert "chat_template" in json.loads((out / "final" / "tokenizer_config.json").read_text(encoding="utf-8"))
    trained = rollouts[0]
    for row, prompt, ids in zip(trained.rows, trained.prompts, trained.prompt_ids):
        chat = [{"role": "user", "content": row.prompt}]
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == hf.bos_token + prompt
        assert hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == ids
    assert (out / "report.md").is_file() and (out / "plots" / "rewards.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--task", "chain_sum", "--n", "3", "--k", "2", "--max-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1 and "pass@2" in result
    assert main(["grpo", "--from", str(base), "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_shared_prompt_packing_gives_the_logprobs_of_separate_sequences(base):
    from seekforge.model.hf import from_pretrained

    model = from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 11)]
    completions = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 1, 6, 4, 2)]
    group = [0, 0, 0, 1, 1]
    seqs = Sequences(prompts, group, completions, torch.zeros(5), torch.ones(5, dtype=torch.bool))
    batch = pack_groups(seqs, [[3, 4], [0, 1, 2]], pad_id=0, device="cpu")
    with torch.no_grad():
        h = model.hidden(batch.tokens, batch.positions, batch.mask)[0].flatten(0, 1)[batch.source]
        packed = token_logprobs(model.head(model.norm(h)), batch.targets)
        for row, i in enumerate(batch.index):
            full = torch.tensor([prompts[group[i]] + completions[i]])
            want = token_logprobs(model(full)[:, :-1], full[:, 1:])[0, -len(completions[i]):]
            got = packed[row, :len(completions[i])]
            assert torch.allclose(got, want, atol=1e-5), (i, got, want)
    assert batch.target_mask.sum(-1).tolist() == [4, 2, 3, 1, 6]
    # one completion per row: plain causal attention over right-padded rows, same logprobs
    single = pack_groups(seqs, [[2], [0], [3]], pad_id=0, device="cpu")
    assert single.mask is None and single.positions is None
    with torch.no_grad():
        h = model.hidden(single.tokens)[0].flatten(0, 1)[single.source]
        again = token_logprobs(model.head(model.norm(h)), single.targets)
    for row, i in enumerate(single.index):
        want = packed[batch.index.index(i), :len(completions[i])]
        assert torch.allclose(again[row, :len(completions[i])], want, atol=1e-5)


@pytest.mark.gpu
def test_cuda_rollouts_replay_graphs_that_see_every_update(base, tmp_path):
    """On a GPU the trainer's engine replays CUDA graphs captured under bf16 autocast over the fp32 policy:
    an in-place update must reach the very next rollout (no stale cast of the weights in the graphs)."""
    from seekforge import SamplingParams

    trainer = GRPOTrainer(_config(base, tmp_path, "device=cuda"), tmp_path / "run")
    assert trainer.llm.runner.graphs  # plain decode steps replay captured graphs
    prompt = trainer.tokenizer.encode(r1_zero_prompt("What is 1 + 2?"))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)

    def rollout():
        trainer.llm.reset_prefix_cache()
        with trainer.autocast(cache=False):
            out = trainer.llm.generate(prompt, greedy)[0]
        return out.token_ids, [lp.logprob for lp in out.logprobs]

    before = rollout()
    assert rollout() == before  # replays are deterministic
    with torch.no_grad():
        trainer.model.head.weight.mul_(-1.0)  # an in-place "update" that reverses every preference
    after = rollout()
    assert after[0] != before[0]
    # the replayed decode steps agree with eager bf16 steps on the updated weights
    trainer.llm.runner.graphs.clear()
    eager = rollout()
    assert eager[0] == after[0]
    torch.testing.assert_close(torch.tensor(eager[1]), torch.tensor(after[1]), atol=0.05, rtol=0)


def _sampled_logprob(logits: torch.Tensor, token: int, temperature: float, top_k: int, top_p: float) -> float:
    """log p(token) under the distribution sampled with these settings, by hand: logits / temperature, keep the
    top_k largest, then the smallest prefix of those (by falling probability, renormalised) whose mass reaches
    top_p; renormalise over what is kept."""
    scaled = logits.double() / temperature
    order = scaled.argsort(descending=True)[:top_k].tolist()
    probs = torch.softmax(scaled[order], dim=0).tolist()
    kept, mass = [], 0.0
    for t, p in zip(order, probs):
        kept.append(t)
        mass += p
        if mass >= top_p:
            break
    assert token in kept, "the engine drew a token outside the filtered distribution"
    return float(scaled[token] - torch.logsumexp(scaled[kept], dim=0))


def test_update_logprobs_are_those_of_the_sampling_distribution(base, tmp_path, monkeypatch):
    """Temperature 0.6 with top-k and top-p: the update's log-probabilities (new, old with mu = 2, reference)
    are those of the distribution the engine drew the completions from, worked out by hand from a plain
    forward of each sequence, so the importance ratio is 1 on the first inner step and the KL term 0."""
    from seekforge.model.hf import from_pretrained

    temperature, top_k, top_p = 0.6, 40, 0.9
    cfg = _config(base, tmp_path, "steps=1", f"temperature={temperature}", f"top_k={top_k}", f"top_p={top_p}",
                  "mu=2", "beta=0.01")
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    seen = {}
    real_batches, real_loss = trainer._micro_batches, grpo.policy_loss

    def batches(seqs, active):
        seen["seqs"], seen["batches"] = seqs, real_batches(seqs, active)
        return seen["batches"]

    def loss(logp, old_logp, advantages, mask, **kw):
        seen.setdefault("calls", []).append((logp.detach(), old_logp, kw["ref_logp"]))
        return real_loss(logp, old_logp, advantages, mask, **kw)

    trainer._micro_batches = batches
    monkeypatch.setattr(grpo, "policy_loss", loss)
    trainer.train()
    model = from_pretrained(base, dtype=torch.float32)  # the policy before the update
    seqs, checked = seen["seqs"], 0
    for batch, (logp, old, ref) in zip(seen["batches"], seen["calls"]):  # the first inner step's calls
        for row, i in enumerate(batch.index):
            prompt, completion = seqs.prompts[seqs.group[i]], seqs.completions[i]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1]
            want = torch.tensor([_sampled_logprob(logits[k], t, temperature, top_k, top_p)
                                 for k, t in enumerate(completion)], dtype=torch.float64)
            n = len(completion)
            ones = torch.ones(n, dtype=torch.float64)
            # the ratio to the distribution sampled from, and to the old policy; the reference sees the same
            torch.testing.assert_close(torch.exp(logp[row, :n].double() - want), ones, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.exp(logp[row, :n] - old[row, :n]).double(), ones, atol=1e-6, rtol=0)
            torch.testing.assert_close(ref[row, :n].double(), want, atol=1e-4, rtol=0)
            checked += n
    assert checked > 10


def test_bnpo_update_averages_the_token_means_of_its_micro_batches(base, tmp_path):
    """One update at ratio 1 (mu = 1, beta = 0): every token's loss is -A. Two groups, each its own micro-batch:
    bnpo is the mean of their token means, counting the tokens of the A = 0 sequence; dapo one token mean."""
    prompts = [list(range(10, 15)), list(range(20, 26))]
    completions = [[30, 31, 32], [33], [34, 35], [36, 37, 38, 39]]
    seqs = Sequences(prompts, [0, 0, 1, 1], completions, torch.tensor([1.0, -1.0, 0.0, 0.5]),
                     torch.ones(4, dtype=torch.bool))
    # micro-batch 1: (-1 * 3 + 1 * 1) / 4 = -0.5; micro-batch 2: (0 * 2 - 0.5 * 4) / 6 = -1/3
    for loss_type, want in (("bnpo", (-0.5 - 1 / 3) / 2), ("dapo", (-3 + 1 + 0 - 2) / 10)):
        cfg = _config(base, tmp_path, f"loss_type={loss_type}", "micro_batch_size=1", "eval_n=1")
        record = GRPOTrainer(cfg, tmp_path / loss_type).update(seqs)
        assert not record["skipped"]
        assert abs(record["loss"] - want) < 1e-6, (loss_type, record["loss"], want)


HAS_DIGIT = '''
def has_digit(prompt, completion, **kw):
    return float(any(ch.isdigit() for ch in completion))
'''


def test_grpo_raises_the_reward_and_learning_rate_zero_does_not(base, tmp_path):
    """A one-token task: reward 1 for a token with a digit in it. The expected reward of the policy on held-out
    prompts, exactly (its next-token distribution times each token's reward), rises under GRPO and stays put,
    to the bit, at learning rate 0 (the schedule's own checks refuse a peak of 0, so that run's schedule is
    replaced); the two runs are otherwise the same (seed, first rollouts). 128 samples a step: at the start
    policy's ~3% reward, fewer leave most groups without a success (no advantage) and the rise to a seed's luck."""
    from types import SimpleNamespace

    from seekforge.rl.rollout import render_prompt

    (tmp_path / "digit.py").write_text(HAS_DIGIT)
    tok = Tokenizer.from_pretrained(base)
    reward = torch.tensor([float(any(ch.isdigit() for ch in tok.decode([t], skip_special_tokens=True)))
                           for t in range(tok.vocab_size)])
    prompts = [tok.encode_prompt(render_prompt(r.prompt, "r1_zero"))
               for r in get_task("chain_sum").rows("test", 8, 0)]

    @torch.no_grad()
    def expected_reward(model) -> float:
        return sum(float(model(torch.tensor([p]))[0, -1].softmax(-1) @ reward) for p in prompts) / len(prompts)

    runs = {}
    cfg = _config(base, tmp_path, "steps=8", "prompts_per_step=8", "group_size=16", "max_tokens=1", "lr=3e-2",
                  f"rewards={tmp_path / 'digit.py'}:has_digit", "save_every=100", "eval_n=1", "seed=0")
    for lr in ("3e-2", "0"):
        trainer = GRPOTrainer(cfg, tmp_path / lr)
        if lr == "0":
            trainer.schedule = SimpleNamespace(lr=lambda step: 0.0)
        before = expected_reward(trainer.model)
        trainer.train()
        runs[lr] = (before, expected_reward(trainer.model), [r["reward"] for r in _records(tmp_path / lr)
                                                              if r.get("kind") != "eval"])
    (start, trained, rewards), (start0, frozen, rewards0) = runs["3e-2"], runs["0"]
    assert start == start0 and rewards[0] == rewards0[0]  # the same policy and the same first rollouts
    assert frozen == start  # lr = 0 changes nothing
    assert trained > start + 0.3, (start, trained)
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.2, rewards

"""SFT: assistant-only loss masks, packing, exact resume of the data position, logit distillation,
rejection sampling into SFT rows, and `seekforge sft` / `seekforge distill` end to end on a tiny model."""

import json
import math

import pytest
import torch

from seekforge.errors import ConfigError, DataError
from seekforge.model import ModelConfig
from seekforge.tasks import get_task, r1_zero_prompt
from seekforge.tokenizer import ASSISTANT, Tokenizer
from seekforge.rl.rejection import SampleConfig, is_correct, rejection_sample
from seekforge.train.lm import document_mask
from seekforge.train.sft import (IGNORE, SFTLoader, collate, distillation_kl, load_sft_config, pack,
                                 read_examples, tokenize_row)


@pytest.fixture(scope="module")
def tok(task_tokenizer):
    return task_tokenizer


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint()


def _targets(example, tok):
    return tok.decode([t for t, keep in zip(example.ids, example.target) if keep])


def test_prompt_completion_rows_train_on_the_completion_and_eos_only(tok):
    ex = tokenize_row({"prompt": "What is 2 + 3?", "completion": " 5"}, tok)
    assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
    assert _targets(ex, tok) == " 5" + tok.eos_token
    assert not any(ex.target[:len(tok.encode("What is 2 + 3?")) + 1])
    every = tokenize_row({"prompt": "What is 2 + 3?", "completion": " 5"}, tok, completion_only=False)
    assert all(every.target)


def test_chat_rows_train_on_every_assistant_turn_only(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"}]
    ex = tokenize_row({"messages": messages}, tok)
    assert _targets(ex, tok) == "2" + tok.eos_token + "4" + tok.eos_token
    marker = tok.token_to_id(ASSISTANT)
    assert sum(t == marker for t in ex.ids) == 2
    with pytest.raises(DataError, match="no assistant turn"):
        tokenize_row({"messages": messages[:2]}, tok)
    with pytest.raises(DataError, match="prompt"):
        tokenize_row({"text": "hello"}, tok)


def test_chat_rows_need_a_template_that_marks_assistant_turns(tok, tmp_path):
    from seekforge.tasks.templates import R1_ZERO_CHAT_TEMPLATE

    r1_zero = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path))
    r1_zero.chat_template = R1_ZERO_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "<think>1+1</think>2"}]
    with pytest.raises(ConfigError, match="writes no .* marker"):
        tokenize_row({"messages": messages}, r1_zero)


def test_first_fit_packing_by_hand():
    # width 8: 5 + 3 fill the first row, 4 opens a second, 2 joins it, 9 is cut to a row of its own
    assert pack([5, 3, 4, 2, 9], [0, 1, 2, 3, 4], 8) == [[0, 1], [2, 3], [4]]
    assert pack([5, 3, 4, 2], [2, 0, 3, 1], 8) == [[2, 3], [0, 1]]


def test_collate_shifts_labels_and_ignores_untrained_tokens():
    from seekforge.train.sft import Example

    a = Example([10, 11, 12, 13], [False, False, True, True])
    b = Example([20, 21, 22], [False, True, True])
    batch = collate([a, b], [[0, 1]], 8, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    # labels[t] = ids[t + 1] where token t + 1 is trained; the last position (padding) has none
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]]
    single = collate([a, b], [[0], [1]], None, pad_id=0)
    assert single["input_ids"].shape == (2, 3) and single["labels"].tolist()[1] == [21, 22, IGNORE]
    # every token trained: still no label from a's last token to b's first; positions restart per example,
    # and the padding is a segment of its own
    every = collate([Example(a.ids, [True] * 4), Example(b.ids, [True] * 3)], [[0, 1]], 9, pad_id=0)
    assert every["labels"].tolist() == [[11, 12, 13, IGNORE, 21, 22, IGNORE, IGNORE]]
    assert every["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert document_mask(every["positions"]).int().tolist() == [[
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]]


def test_packed_examples_train_exactly_as_one_by_one(base, tok, tmp_path):
    from seekforge.model.mtp import depth_targets
    from seekforge.train.sft import build_trainer

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r1_zero_prompt(r.prompt), "completion": "\n" + r.solution}) + "\n"
                            for r in get_task("chain_sum").rows("train", 3, 5)))
    cfg = load_sft_config(None, [f"init_from={base}", f"data={data}", "completion_only_loss=false", "val_fraction=0",
                                 "precision=fp32", "progress=false", "tensorboard=false"])
    trainer = build_trainer(cfg, tmp_path / "run")
    examples, pad = trainer.data.train_examples, tok.pad_id
    lengths = [len(e.ids) for e in examples]
    packed = collate(examples, [[0, 1, 2]], sum(lengths) + 4, pad)  # one row, then padding
    singles = [collate(examples, [[i]], None, pad) for i in range(3)]
    with torch.no_grad():  # the trainer's own loss, MTP included
        out = trainer.loss(packed, mtp_weight=0.3)
        alone = [trainer.loss(b, mtp_weight=0.3) for b in singles]
    per_token = torch.nn.functional.cross_entropy(out.logits[0], packed["labels"][0], reduction="none")
    start = 0
    for n, b, o in zip(lengths, singles, alone):
        torch.testing.assert_close(out.logits[0, start:start + n - 1], o.logits[0], atol=1e-5, rtol=1e-5)
        want = torch.nn.functional.cross_entropy(o.logits[0], b["labels"][0], reduction="none")
        torch.testing.assert_close(per_token[start:start + n - 1], want, atol=1e-5, rtol=1e-5)
        start += n
    counts = [int((b["labels"] != IGNORE).sum()) for b in singles]
    assert out.main_loss.item() == pytest.approx(sum(o.main_loss.item() * c for o, c in zip(alone, counts))
                                                 / sum(counts), rel=1e-5)
    mtp_counts = [int((depth_targets(b["labels"], 1) != IGNORE).sum()) for b in singles]
    assert out.mtp_loss.item() == pytest.approx(sum(o.mtp_loss.item() * c for o, c in zip(alone, mtp_counts))
                                                / sum(mtp_counts), rel=1e-5)


def test_loader_resumes_exactly_across_epochs(tok):
    rows = get_task("chain_sum").rows("train", 30, 1)
    examples = [tokenize_row({"prompt": r1_zero_prompt(r.prompt), "completion": r.solution}, tok) for r in rows]
    a = SFTLoader(examples, 300, 4, tok.pad_id, seed=3)
    for _ in range(5):
        next(a)
    b = SFTLoader(examples, 300, 4, tok.pad_id, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(12):  # well past an epoch
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    with pytest.raises(ConfigError, match="same --data"):
        SFTLoader(examples[:-1], 300, 4, tok.pad_id, seed=3).load_state_dict(a.state_dict())


def test_distillation_kl_by_hand():
    t = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    s = torch.tensor([[[math.log(0.25), math.log(0.75)]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(float(distillation_kl(s, t, mask)) - want) < 1e-6
    # temperature 2: both distributions flatten, scaled by T^2
    pt = torch.softmax(t / 2, -1)[0, 0]
    ps = torch.softmax(s / 2, -1)[0, 0]
    want2 = 4 * float((pt * (pt / ps).log()).sum())
    assert abs(float(distillation_kl(s, t, mask, 2.0)) - want2) < 1e-6
    assert float(distillation_kl(t, t, mask)) == 0
    assert float(distillation_kl(s, t, torch.zeros(1, 1, dtype=torch.bool))) == 0


class ScriptedLLM:
    """Stands in for the engine: answers every prompt with the scripted completions, in order."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts, params):
        from types import SimpleNamespace as NS

        n = params[0].n if isinstance(params, list) else params.n
        outs = []
        for _ in prompts:
            outs.append(NS(outputs=[NS(token_ids=self.tokenizer.encode(t), text=t, finish_reason="stop")
                                    for t in self.texts[:n]]))
        return outs


def test_rejection_sampling_keeps_distinct_correct_answers(tok):
    rows = get_task("chain_sum").rows("train", 3, 0)
    right = f"\nok\n</think>\n<answer>{rows[0].answer}</answer>"
    texts = [right, "\nno\n</think>\n<answer>-1</answer>", right, f"\nalso\n</think>\n<answer>{rows[0].answer}</answer>"]
    cfg = SampleConfig(init_from="unused", task="chain_sum", n_prompts=1, n_per_prompt=4, max_per_prompt=0)
    kept, stats = rejection_sample(ScriptedLLM(tok, texts), cfg)
    assert [k["completion"] for k in kept] == [texts[0], texts[3]]  # the duplicate is dropped
    assert stats["correct"] == 3 and stats["samples"] == 4 and stats["prompts_solved"] == 1
    assert kept[0]["prompt"] == r1_zero_prompt(rows[0].prompt)
    cfg = SampleConfig(init_from="unused", task="chain_sum", n_prompts=1, n_per_prompt=4)  # at most one
    assert len(rejection_sample(ScriptedLLM(tok, texts), cfg)[0]) == 1
    assert not is_correct({"accuracy": 1.0, "format": 0.0}) and not is_correct({"accuracy": None})


def test_sft_end_to_end_resume_and_distillation(base, tmp_path):
    from seekforge.cli import main
    from seekforge.train.sft import build_trainer

    rows = get_task("chain_sum").rows("train", 24, 0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r1_zero_prompt(r.prompt), "completion": "\n" + r.solution})
                            + "\n" for r in rows))
    common = ["seq_len=256", "batch_size=4", "steps=6", "warmup_steps=1", "constant_steps=3", "decay_steps=2",
              "lr=3e-3", "save_every=3", "eval_every=3", "val_fraction=0.2", "progress=false", "tensorboard=false"]
    assert main(["sft", "--from", str(base), "--data", str(data), "--out", str(tmp_path / "a"), *common]) == 0
    assert (tmp_path / "a" / "final" / "tokenizer.json").is_file() and (tmp_path / "a" / "report.md").is_file()
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6)) and "eval_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]

    # stop after the step-3 checkpoint, resume: the same losses step by step
    cfg = load_sft_config(None, [f"init_from={base}", f"data={data}", *common])
    trainer = build_trainer(cfg, tmp_path / "b")
    real, calls = trainer.train_step, []

    def stop_at_four():
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real()

    trainer.train_step = stop_at_four
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    build_trainer(cfg, tmp_path / "b", resume=True).train()
    again = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in records]

    # logit distillation from the base itself into a smaller student trained from scratch
    short = ["steps=2", "warmup_steps=1", "constant_steps=1", "decay_steps=0"]
    assert main(["sft", "--from", str(base), "--data", str(data), "--out", str(tmp_path / "kd"), *common, *short,
                 f"teacher={base}", "kd_weight=0.5", "kd_temperature=2.0"]) == 0
    kd = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert kd[0]["loss"] != kd[0]["main_loss"]  # the KL term is part of the loss
    with pytest.raises(ConfigError, match="teacher"):
        load_sft_config(None, [f"data={data}", "kd_weight=0.5"])


def _parameters_by_hand(c: ModelConfig) -> int:
    """Parameters of a seekforge model of config c from the architecture's formula (untied head, no biases)."""
    d, h = c.dim, c.n_heads
    mla = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * (c.qk_nope_head_dim + c.qk_rope_head_dim)
           + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
           + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
    dense = 3 * d * c.inter_dim
    moe = (c.n_routed_experts * d + 3 * c.n_routed_experts * c.moe_inter_dim * d  # router, routed experts
           + 3 * d * c.n_shared_experts * c.moe_inter_dim)  # shared experts
    block = 2 * d + mla  # two norms and attention, then the dense MLP or the MoE
    layers = sum(block + (moe if i >= c.n_dense_layers else dense) for i in range(c.n_layers))
    mtp = c.n_mtp_modules * (3 * d + 2 * d * d + block + moe)  # norms, eh_proj, one MoE block (shared head)
    return 2 * c.vocab_size * d + d + layers + mtp


def test_distill_command_trains_and_evaluates_students(base, tok, tmp_path, capsys, monkeypatch):
    """Two students of different sizes (depth, experts, width): each one's parameter count against the
    architecture's formula, and its retention = its accuracy / the teacher's."""
    import seekforge.rl.evaluate
    from seekforge.cli import main
    from seekforge.rl import distill

    def fake_traces(cfg, llm, path):  # a random teacher solves nothing: feed gold solutions as its traces
        rows = get_task(cfg.task).rows("train", 16, 0)
        path.write_text("".join(json.dumps({"prompt": r1_zero_prompt(r.prompt), "completion": "\n" + r.solution})
                                + "\n" for r in rows))
        return {"kept": len(rows)}

    small = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_dense_layers=1,
                                               inter_dim=64, n_mtp_modules=0)  # one dense block
    wide = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_dense_layers=1,
                                              inter_dim=96, moe_inter_dim=24, n_routed_experts=4,
                                              n_mtp_modules=0)  # a dense block, then 4 routed experts
    small.save(tmp_path / "small.json")
    wide.save(tmp_path / "wide.json")
    teacher = ModelConfig.load(base)
    counts = {"teacher": _parameters_by_hand(teacher), "small": _parameters_by_hand(small),
              "wide": _parameters_by_hand(wide)}
    assert len(set(counts.values())) == 3
    # A random teacher scores 0 and retention would be undefined: each model's accuracy is set by its size
    # (the rest of the evaluation is real), so retention must pair each student with its own accuracy.
    accuracy = {counts["teacher"]: 0.5, counts["small"]: 0.2, counts["wide"]: 0.4}
    real_evaluate = seekforge.rl.evaluate.evaluate

    def evaluate(llm, cfg):
        return {**real_evaluate(llm, cfg), "accuracy": accuracy[llm.model.num_parameters()["total"]]}

    monkeypatch.setattr(distill, "sample_traces", fake_traces)
    monkeypatch.setattr(seekforge.rl.evaluate, "evaluate", evaluate)
    assert main(["distill", "--teacher", str(base), "--student-config", str(tmp_path / "small.json"),
                 "--student-config", str(tmp_path / "wide.json"), "--task", "chain_sum", "--out", str(tmp_path / "d"),
                 "eval_n=3", "max_tokens=8", "progress=false", "train.steps=2", "train.warmup_steps=1",
                 "train.constant_steps=1", "train.decay_steps=0", "train.seq_len=256", "train.batch_size=2",
                 "train.tensorboard=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["teacher_parameters"] == counts["teacher"]
    assert set(out["students"]) == set(summary["students"]) == {"small", "wide"}
    for label, retention in (("small", 0.2 / 0.5), ("wide", 0.4 / 0.5)):
        entry = summary["students"][label]
        assert entry["parameters"] == out["students"][label]["parameters"] == counts[label], label
        assert entry["eval"]["accuracy"] == accuracy[counts[label]]
        assert abs(entry["retention"] - retention) < 1e-12
        assert abs(out["students"][label]["retention"] - retention) < 1e-12
        assert (tmp_path / "d" / label / "final" / "model.safetensors").is_file()


def test_read_examples_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        read_examples(bad, tok)
    with pytest.raises(DataError, match="not found"):
        read_examples(tmp_path / "missing.jsonl", tok)

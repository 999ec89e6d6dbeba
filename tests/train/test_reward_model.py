"""The reward model: Bradley-Terry loss by hand, save/load in transformers' sequence-classification layout,
and `seekforge rm train` / `rm eval` on a tiny model."""

import json
import math

import pytest
import torch

from seekforge.errors import DataError
from seekforge.tasks import get_task, r1_zero_prompt


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def test_bradley_terry_loss_by_hand():
    from seekforge.train.reward import bradley_terry_loss

    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 0
    by_hand = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(by_hand, abs=1e-6)
    assert by_hand == pytest.approx(0.7732240, abs=1e-6)


def test_reward_is_read_at_the_last_token_that_is_not_padding():
    from seekforge.model.reward import last_token

    pad = 7
    tokens = torch.tensor([[1, 2, 3, pad, pad], [pad, pad, 4, 5, 6], [1, pad, 2, pad, pad], [pad] * 5])
    assert last_token(tokens, pad).tolist() == [2, 4, 2, 0]


def _batch(pad_id: int, vocab: int) -> torch.Tensor:
    """Two rows of ids other than pad_id, the second right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 1, (2, 12), generator=g)
    ids[ids >= pad_id] += 1
    ids[1, 8:] = pad_id
    return ids


def test_reward_model_round_trip_and_transformers_load_it(tiny_checkpoint, task_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from seekforge.model.reward import is_reward_model, load_reward_model

    base = tiny_checkpoint()  # an MTP module, which the reward model drops
    pad = task_tokenizer.pad_id
    torch.manual_seed(0)
    model = load_reward_model(base, pad_id=pad).eval()
    with torch.no_grad():  # a gate bias that is not zero, to see it survive
        for moe in model.moe_layers().values():
            moe.gate.bias.copy_(torch.randn_like(moe.gate.bias) * 0.05)
    model.save_pretrained(tmp_path / "rm")
    assert is_reward_model(tmp_path / "rm") and not is_reward_model(base)
    with safe_open(str(tmp_path / "rm" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "score.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.startswith("model.layers.2.") for k in keys)  # no MTP layer

    tokens = _batch(pad, model.cfg.vocab_size)
    back = load_reward_model(tmp_path / "rm").eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForSequenceClassification"
    with torch.no_grad():
        ours, again, theirs = model(tokens), back(tokens), hf(tokens).logits[:, 0]
    torch.testing.assert_close(again, ours, atol=0, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # padding more does not move a reward
    padded = torch.cat([tokens, torch.full((2, 3), pad)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(back(padded), ours, atol=1e-5, rtol=0)


def _pairs(path, n: int = 24, chat: bool = False):
    """Pairs preferring the correct worked solution to one with a wrong answer."""
    rows = get_task("chain_sum").rows("train", n, 0)
    with open(path, "w") as f:
        for r in rows:
            wrong = r.solution.rsplit(r.answer, 1)[0] + str(int(r.answer) + 1)
            prompt = [{"role": "user", "content": r.prompt}] if chat else r1_zero_prompt(r.prompt)
            f.write(json.dumps({"prompt": prompt, "chosen": "\n" + r.solution, "rejected": "\n" + wrong}) + "\n")
    return path


def test_chat_shaped_pairs_are_rendered_by_the_chat_template(task_tokenizer, tmp_path):
    from seekforge.train.reward import read_pairs

    (chosen, _), = read_pairs(_pairs(tmp_path / "p.jsonl", n=1, chat=True), task_tokenizer)
    r = get_task("chain_sum").rows("train", 1, 0)[0]
    text = task_tokenizer.apply_chat_template([{"role": "user", "content": r.prompt},
                                               {"role": "assistant", "content": "\n" + r.solution}],
                                              add_generation_prompt=False)
    assert task_tokenizer.decode(chosen) == text
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match="rejected"):
        read_pairs(tmp_path / "bad.jsonl", task_tokenizer)


def test_rm_train_and_eval_commands(tiny_checkpoint, tmp_path, capsys):
    from seekforge.cli import main

    data = _pairs(tmp_path / "pairs.jsonl")
    args = ["seq_len=256", "batch_size=4", "steps=4", "warmup_steps=1", "constant_steps=2", "decay_steps=1",
            "lr=1e-3", "eval_every=2", "save_every=2", "val_fraction=0.25", "progress=false", "tensorboard=false"]
    out = tmp_path / "run"
    assert main(["rm", "train", "--init-from", str(tiny_checkpoint()), "--data", str(data), "--out", str(out),
                 *args]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert 0 <= records[-1]["eval_accuracy"] <= 1 and records[-1]["eval_pairs"] == 6
    assert (out / "final" / "tokenizer.json").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    assert main(["rm", "eval", str(out / "final"), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 24 and 0 <= result["accuracy"] <= 1
    assert main(["rm", "eval", str(tiny_checkpoint()), "--data", str(data)]) == 2  # a language model is refused


def test_pair_loader_resumes_exactly_across_epochs():
    from seekforge.train.reward import PairLoader

    pairs = [([1, 2, i], [3, i]) for i in range(5)]
    a = PairLoader(pairs, seq_len=8, batch_size=2, pad_id=0, seed=3)
    for _ in range(3):  # into the second epoch
        next(a)
    b = PairLoader(pairs, seq_len=8, batch_size=2, pad_id=0, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        torch.testing.assert_close(next(b)["input_ids"], next(a)["input_ids"])
    batch = next(a)["input_ids"]  # chosen rows, then rejected rows, right-padded
    assert batch.shape == (4, 3) and (batch[2:, 2] == 0).all()

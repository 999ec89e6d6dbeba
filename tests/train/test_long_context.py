"""Context extension: the passkey task and its rule reward, long documents, the long-context evaluation's grids,
the rope scaling of an extended checkpoint read by transformers, and `seekforge extend` end to end."""

import json
import math

import numpy as np
import pytest
import torch

from seekforge.cli import main
from seekforge.data.loader import open_tokens
from seekforge.data.long_docs import build_long_dataset, join_related, passkey_filler
from seekforge.documents import Prompted
from seekforge.errors import ConfigError
from seekforge.model import ModelConfig, Transformer
from seekforge.rewards import accuracy_reward, r1_zero_prompt, row_fields
from seekforge.tasks import get_task, list_tasks
from seekforge.tasks.passkey import FILLER, probe_prefix
from seekforge.tokenizer import Tokenizer
from seekforge.train import long_eval
from seekforge.train.extend import ExtendConfig

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:config.json declares")]


@pytest.fixture(scope="module")
def tokenizer():
    task = get_task("passkey", max_filler=6)
    texts = [task.corpus_text(r) for r in task.rows("train", 200, 0)]
    return Tokenizer.train(texts, 300)


def test_passkey_rows_hide_the_key_at_its_depth_and_the_rule_reward_scores_it():
    assert "passkey" in list_tasks()
    rows = get_task("passkey", min_filler=8, max_filler=8, depth=0.25, digits=6).rows("test", 5, 1)
    assert rows == get_task("passkey", min_filler=8, max_filler=8, depth=0.25, digits=6).rows("test", 5, 1)
    for row in rows:
        assert len(row.answer) == 6 and row.answer.isdigit()
        before, after = row.prompt.split(f"The pass key is {row.answer}. Remember it.")
        assert sum(before.count(s) for s in FILLER) == 2 and sum(after.count(s) for s in FILLER) == 6
        assert row.prompt.endswith("What is the pass key?") and row.prompt.count(row.answer) == 1
        fields = row_fields(row)
        assert accuracy_reward(r1_zero_prompt(row.prompt), f" recall </think> <answer>{row.answer}</answer>",
                               **fields) == 1.0
        wrong = str(int(row.answer) + 1)
        assert accuracy_reward(r1_zero_prompt(row.prompt), f"</think> <answer>{wrong}</answer>", **fields) == 0.0
        assert get_task("passkey").corpus_text(row) == f"{row.prompt} The pass key is {row.answer}."
        assert get_task("passkey", loss="answer").corpus_text(row) == \
            Prompted(f"{row.prompt} The pass key is ", f"{row.answer}.")
    # `loss` chooses the documents the rows make, not the rows
    assert get_task("passkey", loss="answer", max_filler=3).rows("train", 9, 2) == \
        get_task("passkey", max_filler=3).rows("train", 9, 2)
    train = {r.answer for r in get_task("passkey").rows("train", 200, 0)}
    assert not train & {r.answer for r in get_task("passkey").rows("test", 200, 0)}
    with pytest.raises(ConfigError, match="depth"):
        get_task("passkey", depth=1.5)
    with pytest.raises(ConfigError, match="max_filler"):
        get_task("passkey", min_filler=5, max_filler=2)
    with pytest.raises(ConfigError, match="loss must be 'all'"):
        get_task("passkey", loss="key")


def test_related_documents_are_joined_in_order_up_to_the_length():
    docs = [("a", "a1" * 5), ("b", "b1" * 5), ("a", "a2" * 5), ("a", "a3" * 5), ("b", "b2" * 5)]
    joined = join_related(docs, min_chars=20)
    assert joined == ["a1" * 5 + "\n\n" + "a2" * 5, "b1" * 5 + "\n\n" + "b2" * 5, "a3" * 5]


def test_long_documents_train_passkeys_on_the_key_when_asked(tokenizer, tmp_path):
    """`passkey={"loss": "answer"}`: the passkey documents' context is untrained, the joined task documents' not."""
    meta = build_long_dataset(tmp_path / "d", tokenizer, 96, 6000, passkey_share=0.5, passkey={"loss": "answer"},
                              val_fraction=0.0)
    offsets, context = np.load(tmp_path / "d" / "train.docs.npy"), np.load(tmp_path / "d" / "train.loss_from.npy")
    tokens = np.asarray(open_tokens(tmp_path / "d", "train"))
    keyed = [k for k in range(meta["splits"]["train"]["docs"]) if context[k]]
    assert 0.3 < len(keyed) / len(context) < 0.7
    for k in range(len(context)):
        text = tokenizer.decode(tokens[offsets[k]:offsets[k + 1]].tolist())
        assert ("What is the pass key?" in text) == (k in keyed)
        if k in keyed:  # the targets are the key, its full stop and EOS
            assert tokenizer.decode(tokens[offsets[k] + context[k]:offsets[k + 1] - 2].tolist()).isdigit()
    with pytest.raises(ConfigError, match="loss must be"):
        ExtendConfig(passkey={"loss": "everything"})


def test_passkey_documents_are_about_the_length_they_are_made_for(tokenizer):
    sentence = np.mean([len(tokenizer.encode(" " + s)) for s in FILLER])
    for length in (40, 90, 200):
        n = passkey_filler(tokenizer, length)
        rows = get_task("passkey", min_filler=n, max_filler=n).rows("train", 20, 0)
        sizes = [len(tokenizer.encode_prompt(probe_prefix(r) + r.answer)) for r in rows]
        assert abs(np.mean(sizes) - length) < sentence  # within one filler sentence


def test_eval_grids_have_the_shapes_asked_and_perplexity_reads_the_same_tokens(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, n_mtp_modules=0, n_layers=2)
    model = Transformer(cfg).eval()
    tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 2000)
    ppl = long_eval.perplexity_by_length(model, tokens, [16, 32, 64], windows=3)
    assert [p["length"] for p in ppl] == [16, 32, 64] and {p["tokens"] for p in ppl} == {192}
    # a random model: about uniform over the vocabulary at every length
    for p in ppl:
        assert p["ppl"] == pytest.approx(math.exp(p["loss"])) and 0.5 < p["loss"] / math.log(cfg.vocab_size) < 1.5
    with torch.no_grad():  # length 32 by hand: 6 windows of 32 inputs, each with the next token as its label
        nll = [-torch.log_softmax(model(torch.from_numpy(tokens[i:i + 32]).long()[None]), -1)[0]
               .gather(-1, torch.from_numpy(tokens[i + 1:i + 33]).long()[:, None]).mean() for i in range(0, 192, 32)]
    assert ppl[1]["loss"] == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)
    grid = long_eval.passkey_grid(model, tokenizer, [40, 80, 120], [0.0, 0.5, 1.0, 0.3], samples=2)
    assert np.array(grid["accuracy"]).shape == (4, 3)
    assert all(0.0 <= a <= 1.0 for row in grid["accuracy"] for a in row)
    assert all(abs(t - n) < 0.2 * n for t, n in zip(grid["tokens"], grid["lengths"]))
    with pytest.raises(Exception, match="held-out tokens"):
        long_eval.perplexity_by_length(model, tokens[:100], [64], windows=2)


def test_passkey_accuracy_is_greedy_retrieval(tokenizer):
    """A model that predicts the key is scored right, one digit off is wrong: the check reads the key's tokens."""
    rows = get_task("passkey", min_filler=2, max_filler=2).rows("test", 3, 0)
    probes = [long_eval._probe(tokenizer, r) for r in rows]

    class Oracle(torch.nn.Module):
        def __init__(self, flip: bool):
            super().__init__()
            self.weight, self.flip = torch.nn.Parameter(torch.zeros(1)), flip

        def forward(self, inputs):
            out = torch.zeros(*inputs.shape, tokenizer.vocab_size)
            for j, (ids, _) in enumerate(probes):
                for t in range(len(ids) - 1):
                    out[j, t, ids[t + 1]] = 1.0
                if self.flip:
                    out[j, len(ids) - 2] = 0.0
                    out[j, len(ids) - 2, (ids[-1] + 1) % tokenizer.vocab_size] = 1.0
            return out

    assert long_eval.passkey_accuracy(Oracle(False), tokenizer, rows, batch_size=3)[0] == 1.0
    assert long_eval.passkey_accuracy(Oracle(True), tokenizer, rows, batch_size=3)[0] == 0.0


def test_extension_rope_scaling_round_trips_through_transformers(tmp_path):
    """What every stage writes (V3's YaRN: beta 32/1, mscale = mscale_all_dim = 1) is read by transformers'
    DeepseekV3Config into the same frequencies, attention factor and softmax scale, and back into ours."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    from seekforge.model.rope import rope_frequencies

    yarn = ExtendConfig(factor=16).yarn(64)
    cfg = ModelConfig.preset("tiny").replace(**yarn)
    cfg.save(tmp_path / "config.json")
    scaling = json.loads((tmp_path / "config.json").read_text())["rope_scaling"]
    assert scaling == {"type": "yarn", "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    assert hf.max_position_embeddings == 1024 and hf.rope_parameters["rope_type"] == "yarn"
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours, factor = rope_frequencies(cfg)
    torch.testing.assert_close(ours, inv_freq.float(), rtol=0, atol=0)
    assert factor == pytest.approx(attention_factor)
    mscale = 0.1 * math.log(16) + 1
    assert cfg.softmax_scale == pytest.approx(DeepseekV3Attention(hf, 0).scaling) \
        == pytest.approx(cfg.qk_head_dim ** -0.5 * mscale ** 2)
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_extend_config_errors(capsys):
    with pytest.raises(ConfigError, match="factor"):
        ExtendConfig(factor=1.0)
    with pytest.raises(ConfigError, match="rising"):
        ExtendConfig(stages=[16, 4])
    with pytest.raises(ConfigError, match="exceeds YaRN's factor"):
        ExtendConfig(factor=8, stages=[4, 16])
    with pytest.raises(SystemExit):
        main(["extend", "--from", "nowhere", "--out", "x", "--stages", "4,a"])
    assert "e.g. 4,16" in capsys.readouterr().err
    assert main(["extend", "--from", "nowhere", "--out", "x", "--factor", "2"]) == 2
    assert "exceeds YaRN's factor" in capsys.readouterr().err


def _base_extended_4x(tmp_path, train: list[str], extend: list[str]):
    """A `passkey`-config base trained with `train`'s overrides, then one 4x YaRN stage with `extend`'s: the
    extension's directory."""
    quiet = ["progress=false", "tensorboard=false"]
    base, out = tmp_path / "base", tmp_path / "long"
    assert main(["train", "--config", "passkey", "--out", str(base), *train, *quiet]) == 0
    assert main(["extend", "--from", str(base / "final"), "--out", str(out), "--factor", "4", "--stages", "4",
                 *extend, *quiet]) == 0
    return out


def test_extend_end_to_end_lowers_perplexity_past_the_original_context(tmp_path, capsys):
    """A tiny model trained at 32 tokens, extended 4x with YaRN: its perplexity at 128 tokens falls below the
    base model's there, and below the base model's with YaRN and no training; the checkpoint's config.json
    carries the rope scaling transformers reads."""
    transformers = pytest.importorskip("transformers")
    out = _base_extended_4x(tmp_path, ["seq_len=32", "model_overrides.max_seq_len=32", "steps=60", "warmup_steps=10",
                                       "constant_steps=30", "decay_steps=20", "batch_size=8", "builtin_docs=500",
                                       "builtin_vocab=320", "builtin_tasks.passkey.min_filler=0",
                                       "builtin_tasks.passkey.max_filler=2", "eval_every=60", "save_every=60"],
                            ["steps=20", "warmup_steps=3", "tokens_per_step=1024", "lr=2e-3", "eval_multiples=[1, 4]",
                             "eval_depths=[0.5]", "eval_samples=2", "eval_windows=4"])
    hf = transformers.DeepseekV3Config.from_pretrained(out / "stage1" / "final")
    assert hf.max_position_embeddings == 128
    assert {k: hf.rope_parameters[k] for k in ("rope_type", "factor", "original_max_position_embeddings")} == \
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    results = json.loads((out / "long_context.json").read_text())["models"]
    ppl = {label: [p["ppl"] for p in r["perplexity"]] for label, r in results.items()}
    assert list(ppl) == ["base", "base + YaRN, untrained", "stage 1 (4x)"]
    assert ppl["stage 1 (4x)"][1] < ppl["base"][1] and ppl["stage 1 (4x)"][1] < ppl["base + YaRN, untrained"][1]
    assert (out / "plots" / "perplexity_by_length.png").is_file()
    report = (out / "report.md").read_text()
    assert "plots/passkey_stage_1_4x_.png" in report and "ppl @128" in report


def test_extended_4x_reads_passkeys_past_the_original_context_better_than_before(tmp_path):
    """The issue's test at toy scale: a tiny model pretrained at 64 tokens on passkey documents of its whole
    context, trained on the key, reads keys at every depth at 64 tokens and not at 2x-4x; extended 4x with YaRN
    (one stage at 256 tokens, passkey documents one to a row, trained on the key), it reads them there better
    than before, and better than the base with YaRN and no training (which reads some at 2x)."""
    out = _base_extended_4x(tmp_path, ["steps=1000", "constant_steps=980", "decay_steps=0", "mtp_weight=0",
                                       "mtp_weight_late=0", 'builtin_tasks={"passkey": {"min_filler": 5, '
                                       '"max_filler": 6, "loss": "answer"}}', "eval_every=1000", "save_every=1000"],
                            ["steps=100", "warmup_steps=5", "tokens_per_step=4096", "passkey_share=0.9",
                             "passkey.loss=answer", "train.rows=documents", "eval_multiples=[1, 2, 4]",
                             "eval_depths=[0, 0.5, 1]", "eval_samples=8", "eval_windows=2"])
    results = json.loads((out / "long_context.json").read_text())["models"]
    read = {label: np.mean(r["passkey"]["accuracy"], axis=0) for label, r in results.items()}  # by length
    base_read, untrained, extended = read["base"], read["base + YaRN, untrained"], read["stage 1 (4x)"]
    assert base_read[0] >= 0.75, read  # the base reads keys at every depth of its own context
    assert extended[1:].mean() >= base_read[1:].mean() + 0.25, read  # and the extended model past it
    assert extended[1:].mean() > untrained[1:].mean(), read

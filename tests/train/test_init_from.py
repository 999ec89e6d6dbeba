"""Continuing from a checkpoint with model_overrides: YaRN context extension loads the weights and changes the
config (checked against transformers' YaRN), the run's final/config.json carries DeepSeek-V3's rope_scaling,
and overrides that would reshape the weights are refused by name."""

import json
import math

import pytest
import torch

from hf_reference import BASE, CASES, save_hf
from seekforge.errors import ConfigError
from seekforge.model.hf import from_pretrained
from seekforge.model import ModelConfig, Transformer
from seekforge.train.init_from import build_model, model_config
from seekforge.train.pretrain import build_trainer, load_train_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:config.json declares")]

YARN = {"rope_factor": 4.0, "original_seq_len": 256, "max_seq_len": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def test_yarn_overrides_over_a_checkpoint_match_transformers_yarn(tmp_path):
    transformers = pytest.importorskip("transformers")
    case = "v3_sigmoid_grouped_qlora"  # written by transformers without rope scaling, 256 positions
    base = save_hf(case, tmp_path)
    cfg = model_config("tiny", str(tmp_path), YARN, vocab_size=96, seq_len=300)
    ours = build_model(cfg, str(tmp_path), YARN).eval()
    assert (ours.cfg.rope_factor, ours.cfg.max_seq_len) == (4.0, 1024)

    hf_cfg = transformers.DeepseekV3Config(**{**BASE, **CASES[case][1], "max_position_embeddings": 1024,
                                              "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 256,
                                                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                                               "mscale_all_dim": 1.0}})
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    ref.load_state_dict(base.state_dict())  # the checkpoint's weights under the extended rotary embedding
    tokens = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(0))  # past 256
    with torch.no_grad():
        expected, got = ref(tokens).logits, ours(tokens)
        unscaled = from_pretrained(tmp_path, dtype=torch.float32)(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (unscaled - expected).abs().max() > 1e-2  # the scaling matters at these lengths


def test_context_extension_run_loads_weights_and_saves_v3_rope_scaling(tmp_path):
    from seekforge.data.corpus import build_builtin_dataset

    data = tmp_path / "data"
    build_builtin_dataset(data, n_docs=100, seed=0, vocab_size=300, progress=False)
    torch.manual_seed(123)  # not the run's seed: a fresh initialisation would not match these weights
    base_cfg = ModelConfig.preset("tiny").replace(vocab_size=300, dim=64, inter_dim=128, moe_inter_dim=32,
                                                  n_layers=2, max_seq_len=32)
    Transformer(base_cfg).save_pretrained(tmp_path / "base")
    overrides = ["model_overrides.rope_factor=4", "model_overrides.original_seq_len=32",
                 "model_overrides.max_seq_len=128", "model_overrides.mscale_all_dim=1.0"]
    cfg = load_train_config("tiny", [f"init_from={tmp_path / 'base'}", *overrides, "seq_len=64", "batch_size=2",
                                     "steps=2", "warmup_steps=1", "constant_steps=1", "decay_steps=0",
                                     f"data={data}", f"tokenizer={data / 'tokenizer'}", "precision=fp32",
                                     "progress=false", "tensorboard=false"])
    trainer = build_trainer(cfg, tmp_path / "run")
    loaded = from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
    attn = trainer.model.layers[0].attn  # YaRN's attention temperature: (0.1 ln 4 + 1)^2 / sqrt(d_qk)
    assert attn.softmax_scale == pytest.approx((0.1 * math.log(4) + 1) ** 2 / math.sqrt(32))
    trainer.train()
    trainer.export()

    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["max_position_embeddings"] == 128
    # DeepSeek-V3's form (its config.json: type yarn, factor 40, original 4096, betas 32/1, mscales 1.0)
    scaling = {k: v for k, v in saved["rope_scaling"].items() if k != "rope_type"}
    assert scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
                       "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert saved["rope_scaling"].get("rope_type", "yarn") == "yarn"
    assert from_pretrained(tmp_path / "run" / "final").cfg.rope_factor == 4.0


@pytest.mark.parametrize("overrides, named", [
    ({"dim": 96}, "dim"),
    ({"n_layers": 3, "rope_factor": 2.0}, "n_layers"),
    ({"vocab_size": 640}, "vocab_size"),
    ({"n_routed_experts": 16}, "n_routed_experts"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_overrides_that_reshape_a_checkpoint_are_refused_by_name(tmp_path, overrides, named):
    cfg = ModelConfig.preset("tiny").replace(dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2)
    cfg.save(tmp_path / "config.json")  # the shape is all that is checked: no weights need be written
    with pytest.raises(ConfigError, match=rf"model_overrides {named} would change the shape .*Remove {named} "
                                          rf"from model_overrides"):
        model_config("tiny", str(tmp_path), overrides, vocab_size=300, seq_len=64)
    kept = model_config("tiny", str(tmp_path), {"rope_factor": 2.0, "max_seq_len": 2048, "route_scale": 1.0},
                        vocab_size=300, seq_len=1500)
    assert (kept.rope_factor, kept.max_seq_len, kept.route_scale, kept.dim) == (2.0, 2048, 1.0, 64)


def test_sft_applies_the_same_overrides(tmp_path, tiny_checkpoint):
    from seekforge.train.sft import build_trainer as sft_trainer, load_sft_config

    base = tiny_checkpoint()  # max_seq_len 512: the overrides extend it four times
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "What is 1 + 2?", "completion": " 3"}) + "\n")
    common = [f"init_from={base}", f"data={tmp_path / 'data.jsonl'}", "progress=false",
              "tensorboard=false", "seq_len=256"]
    trainer = sft_trainer(load_sft_config(None, [*common, "model_overrides={rope_factor: 4, max_seq_len: 2048}"]),
                         tmp_path / "sft")
    assert (trainer.model.cfg.rope_factor, trainer.model.cfg.max_seq_len) == (4.0, 2048)
    with pytest.raises(ConfigError, match="model_overrides dim would change the shape"):
        sft_trainer(load_sft_config(None, [*common, "model_overrides={dim: 96, max_seq_len: 2048}"]), tmp_path / "x")

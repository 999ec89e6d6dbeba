"""Bad checkpoints give clear errors naming the file, the key and the fix."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import seekforge
from seekforge import CheckpointError, ConfigError


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = seekforge.Transformer(seekforge.ModelConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        seekforge.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        seekforge.from_pretrained(tmp_path / "missing")


def test_no_safetensors(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        seekforge.from_pretrained(path)


def test_inconsistent_config(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts_per_tok"] = 99
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="99"):
        seekforge.from_pretrained(path)


def test_missing_tensor(ckpt):
    path, _ = ckpt
    _edit(path, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match="missing.*layers.1.attn.wkv_b"):
        seekforge.from_pretrained(path)


def test_missing_expert(ckpt):
    path, _ = ckpt
    _edit(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers.2.ffn.experts.w3\[experts \[5\]"):
        seekforge.from_pretrained(path)


def test_misshaped_tensor(ckpt):
    path, _ = ckpt
    _edit(path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(7,\).*\(128,\)"):
        seekforge.from_pretrained(path)


def test_unexpected_key_is_reported_not_dropped(ckpt):
    path, _ = ckpt
    _edit(path, lambda t: t.update({"model.layers.1.mlp.bonus.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match="unexpected.*model.layers.1.mlp.bonus.weight.*model.safetensors"):
        seekforge.from_pretrained(path)


def test_truncated_file(ckpt):
    path, _ = ckpt
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        seekforge.from_pretrained(path)
    (path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        seekforge.from_pretrained(path)


def test_sharded_checkpoint_with_index(ckpt, tmp_path):
    path, model = ckpt
    seekforge.model.hf.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 3
    back = seekforge.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model.eval()(tokens), atol=0, rtol=0)


def test_fp8_block_weights_are_dequantised(ckpt):
    path, model = ckpt
    key = "model.layers.0.mlp.gate_proj.weight"  # [384, 128]: 3 x 1 blocks of 128 x 128
    block = 128
    scales = torch.tensor([[0.5], [2.0], [0.25]])

    def quantise(t):
        w = t[key].float()
        q = (w / scales.repeat_interleave(block, 0)).to(torch.float8_e4m3fn)
        t[key] = q
        t[key + "_scale_inv"] = scales
        t["expected"] = q.float() * scales.repeat_interleave(block, 0)

    tensors = load_file(path / "model.safetensors")
    quantise(tensors)
    expected = tensors.pop("expected")
    save_file(tensors, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    back = seekforge.from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(back.layers[0].ffn.w1.weight, expected, atol=0, rtol=0)
    assert (back.layers[0].ffn.w1.weight - model.layers[0].ffn.w1.weight).abs().max() < 0.01


def test_save_is_atomic_over_an_existing_checkpoint(ckpt, monkeypatch):
    path, model = ckpt
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(seekforge.model.hf, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]

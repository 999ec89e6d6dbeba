"""Hugging Face checkpoint interop: DeepSeek-V2 / V2-Lite / V3 directories in, the same layout out.

Loading builds the model on the meta device, allocates it once in the target dtype, then streams the
safetensors files tensor by tensor into it, so peak memory is the model plus one tensor. FP8 weights
(float8_e4m3fn with a weight_scale_inv per 128x128 block) are dequantised on the way, or with fp8_weights kept as
they are (`seekforge.model.fp8_weights`; a 16-bit checkpoint's weights are then quantised blockwise on the way).
A model with FP8 weights saves them in the same layout, with DeepSeek-V3's quantization_config in config.json.
Every key is accounted for: missing, mis-shaped and unexpected tensors are errors naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from seekforge.configio import fsync_dir
from seekforge.errors import CheckpointError, ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.fp8_weights import QUANTIZATION_CONFIG, SCALE_SUFFIX, has_fp8_weights, to_fp8_weights
from seekforge.model.transformer import Transformer, default_dtype
from seekforge.ops.quant import BLOCK, FP8, quantise_blocks

# transformers' submodule names -> ours (DeepSeek's inference code names)
_HF_TO_OURS = {
    "self_attn": "attn", "mlp": "ffn", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "e_score_correction_bias": "bias",
}
_OURS_TO_HF = {v: k for k, v in _HF_TO_OURS.items()}
_EXPERT = re.compile(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_MTP_OWN = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
# copies of the shared embedding and head that V3 stores inside each MTP layer
_MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}


def hf_to_ours(key: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Our parameter name (and expert index for stacked experts) for an HF key; None if unknown."""
    fixed = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "head.weight"}
    if key in fixed:
        return fixed[key], None
    m = _LAYER.match(key)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer < cfg.n_layers:
        prefix = f"layers.{layer}."
    elif layer < cfg.n_layers + cfg.n_mtp_modules:
        prefix = f"mtp.{layer - cfg.n_layers}."
        if rest in _MTP_OWN:
            return prefix + rest, None
        if rest == "shared_head.norm.weight":
            return prefix + "norm.weight", None
        if rest in _MTP_SHARED:
            return _MTP_SHARED[rest], -1  # -1: a duplicate of a shared tensor
        prefix += "block."
    else:
        return None
    expert = None
    em = _EXPERT.match(rest)
    if em:
        rest, expert = f"{em.group(1)}.experts.{_HF_TO_OURS[em.group(3)]}", int(em.group(2))
    parts = rest.split(".")
    return prefix + ".".join(_HF_TO_OURS.get(p, p) for p in parts), expert


def ours_to_hf(model: Transformer):
    """Yield (HF key, tensor) for every tensor of the HF layout, experts unstacked, MTP as extra layers."""
    cfg = model.cfg
    for name, tensor in model.state_dict().items():
        if name == "head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("mtp."):
            _, j, rest = name.split(".", 2)
            prefix = f"model.layers.{cfg.n_layers + int(j)}."
            if rest in _MTP_OWN:
                yield prefix + rest, tensor
                continue
            if rest == "norm.weight":
                yield prefix + "shared_head.norm.weight", tensor
                continue
            rest = rest.removeprefix("block.")
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            prefix = f"model.layers.{i}."
        else:
            yield {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "head.weight": "lm_head.weight"}[name], tensor
            continue
        raw, suffix = rest.split("."), ""
        if len(raw) == 3 and raw[1] == "experts" and raw[2].endswith(SCALE_SUFFIX):  # FP8 experts' block scales
            raw[2], suffix = raw[2].removesuffix(SCALE_SUFFIX), SCALE_SUFFIX
        parts = [_OURS_TO_HF.get(p, p) for p in raw]
        if parts[-1] == "e_score_correction_bias" and cfg.topk_method != "noaux_tc" and not tensor.any():
            continue  # transformers' deepseek_v2 has no bias; a zero one carries no information
        if len(parts) == 3 and parts[1] == "experts":  # mlp.experts.{gate,up,down}_proj stacked
            for e in range(tensor.shape[0]):
                yield f"{prefix}mlp.experts.{e}.{parts[2]}.weight{suffix}", tensor[e]
            continue
        yield prefix + ".".join(parts), tensor
    for j in range(cfg.n_mtp_modules):
        prefix = f"model.layers.{cfg.n_layers + j}."
        yield prefix + "embed_tokens.weight", model.embed.weight.detach().clone()
        yield prefix + "shared_head.head.weight", model.head.weight.detach().clone()


# ---------------------------------------------------------------------------------------------- loading
def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err}); re-download it") from err
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files; a Hugging Face checkpoint directory holds "
                              f"config.json and model*.safetensors")
    return files


def _pick_dtype(path: Path, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    raw = json.loads((path / "config.json").read_text())
    name = raw.get("torch_dtype") or raw.get("dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.bfloat16)


def _dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _drop_absent_mtp(cfg: ModelConfig, files: list[Path]) -> ModelConfig:
    """transformers writes num_nextn_predict_layers into config.json but never the MTP weights: a checkpoint
    with none of them loads without MTP (with a warning); one with some of them must have all of them."""
    if not cfg.n_mtp_modules:
        return cfg
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError):
            return cfg  # the main loop reports the broken file
        for key in keys:
            m = _LAYER.match(key)
            if m and int(m.group(1)) >= cfg.n_layers:
                return cfg
    warnings.warn(f"config.json declares {cfg.n_mtp_modules} MTP module(s) but the checkpoint holds none of "
                  f"their weights; loading without MTP (no speculative drafting)", stacklevel=3)
    return cfg.replace(n_mtp_modules=0)


def from_pretrained(path, dtype=None, device=None, changes: dict | None = None, head: bool = True,
                    extra: dict[str, torch.Tensor] | None = None, fp8_weights: bool = False) -> Transformer:
    """Load a DeepSeek-V2/V2-Lite/V3 checkpoint directory (config.json + safetensors, sharded or not).
    `changes`: ModelConfig fields to set over config.json's (e.g. YaRN's rope_factor and max_seq_len to extend
    the context); they must leave every tensor's shape as it is, or the checkpoint does not load.
    `head=False` loads the backbone alone (the model's `head` is None): a checkpoint's lm_head, if any, is
    skipped, as a scoring model built on a language model has no use for it. `extra` maps HF keys outside the
    language model's layout (a sequence classifier's "score.weight") to tensors they are copied into; each must
    be in the checkpoint. `fp8_weights`: the blocks' weights stay FP8 (`seekforge.model.fp8_weights`, about half
    of bf16's memory): an FP8 checkpoint's e4m3 weights and 128x128 block scales as they are, a 16-bit one's
    quantised blockwise; `dtype` is then that of everything else (embedding, head, norms, wkv_b)."""
    if not isinstance(fp8_weights, bool):
        raise ConfigError(f"fp8_weights is true or false, got {fp8_weights!r}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a checkpoint directory with config.json")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint directory holds config.json "
                              f"and model*.safetensors")
    cfg = ModelConfig.load(path)
    if changes:
        cfg = cfg.replace(**changes)
    files = _checkpoint_files(path)
    cfg = _drop_absent_mtp(cfg, files)
    raw_cfg = json.loads((path / "config.json").read_text())
    quant = raw_cfg.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    if fp8_weights and quant and block != (BLOCK, BLOCK):
        raise ConfigError(f"{path}: fp8_weights keeps weights in {BLOCK}x{BLOCK} blocks, this checkpoint's "
                          f"weight_block_size is {list(block)}; load it without fp8_weights (dequantised)")
    dtype = _pick_dtype(path, dtype)
    device = torch.device(device or "cpu")

    with torch.device("meta"), default_dtype(dtype):
        model = Transformer(cfg)
        if fp8_weights:
            to_fp8_weights(model)
    if not head:
        model.head = None
    model.to_empty(device=device)
    model.rope.reset_parameters()
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    pending = {name: (set(range(t.shape[0])) if name.endswith(("experts.w1", "experts.w2", "experts.w3")) else None)
               for name, t in params.items() if name != "rope.inv_freq" and not name.endswith(SCALE_SUFFIX)}
    if cfg.tie_word_embeddings:
        pending.pop("head.weight", None)
    optional = {n for n in pending if n.endswith("gate.bias") and cfg.topk_method != "noaux_tc"}
    unexpected: list[str] = []
    extra = dict(extra or {})

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: cannot read safetensors ({err}); the file is truncated or corrupt, "
                                  f"re-download or re-save it") from err
        with handle as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("weight_scale_inv"):
                    if key.removesuffix("_scale_inv") not in keys:
                        unexpected.append(f"{key} (in {file.name})")
                    continue
                if key in extra:
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(extra[key].shape):
                        raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                              f"{tuple(extra[key].shape)}")
                    with torch.no_grad():
                        extra.pop(key).copy_(tensor)
                    continue
                if not head and key == "lm_head.weight":
                    continue
                target = hf_to_ours(key, cfg)
                if target is not None and target[1] == -1:
                    continue  # MTP's copy of the shared embedding / head
                if target is None or target[0] not in params:
                    unexpected.append(f"{key} (in {file.name})")
                    continue
                name, expert = target
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {key} ({err}); the file is truncated or "
                                          f"corrupt, re-download or re-save it") from err
                scale_key = key + SCALE_SUFFIX
                if tensor.dtype == FP8 and scale_key not in keys:
                    raise CheckpointError(f"{file}: fp8 tensor {key} has no {scale_key} beside it")
                if name + SCALE_SUFFIX in params:  # an FP8 weight: the checkpoint's blocks, or quantised here
                    scale = f.get_tensor(scale_key) if tensor.dtype == FP8 else None
                    if scale is None:
                        tensor, scale = quantise_blocks(tensor)
                    dest = params[name + SCALE_SUFFIX] if expert is None else params[name + SCALE_SUFFIX][expert]
                    if tuple(scale.shape) != tuple(dest.shape):
                        raise CheckpointError(f"{file}: tensor {scale_key} has shape {tuple(scale.shape)}, expected "
                                              f"{tuple(dest.shape)} (one scale per {BLOCK}x{BLOCK} block)")
                    with torch.no_grad():
                        dest.copy_(scale)
                elif tensor.dtype == FP8:
                    tensor = _dequantize_fp8(tensor, f.get_tensor(scale_key), block)
                dest = params[name] if expert is None else params[name][expert]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)} but config.json "
                                          f"implies {tuple(dest.shape)}; the checkpoint and its config disagree")
                with torch.no_grad():
                    dest.copy_(tensor)
                if expert is None:
                    pending.pop(name, None)
                elif name in pending:
                    pending[name].discard(expert)
                    if not pending[name]:
                        pending.pop(name)

    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) that this config has no place for: "
                              f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}; check "
                              f"num_hidden_layers / num_nextn_predict_layers / n_routed_experts in config.json")
    missing = list(extra)
    for name, experts in pending.items():
        if name in optional:
            continue
        missing.append(name if experts is None else f"{name}[experts {sorted(experts)[:4]}...]")
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; the files are "
                              f"incomplete or config.json describes a larger model")
    for name in optional & set(pending):
        params[name].zero_()
    return model.eval()


# ---------------------------------------------------------------------------------------------- saving
def save_pretrained(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, config: dict | None = None,
                    tensors=None) -> None:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) in HF's layout.
    The directory appears whole or not at all: it is written beside the target and renamed into place.
    `config` (config.json's fields) and `tensors` ((HF key, tensor) pairs) replace the language model's own
    (`model.cfg`, `ours_to_hf(model)`), for models built on it (a reward model's head and classifier config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    if config is None and has_fp8_weights(model):  # e4m3 weights beside their weight_scale_inv, as DeepSeek-V3's
        config = {**model.cfg.to_hf_dict(), "quantization_config": QUANTIZATION_CONFIG}
    try:
        if config is None:
            model.cfg.save(tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in ours_to_hf(model) if tensors is None else tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor.detach().contiguous().cpu()
            size += nbytes
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Tensor parallelism (seekforge.parallel.tensor) on 2 and 4 gloo ranks against the same model in one process.

The reference is the unsplit model run here, in the test's own process, on the same tokens: the loss (main, MTP,
balance), the expert load, every parameter's gradient (a split one gathered with full_tensor), then ten AdamW
steps with the auxiliary-loss-free bias update must match it within 1e-5 relative (a tensor's error norm over its
norm; the final weights land about 2e-6 off at tp=2 and 5e-6 at tp=4, where one process on one thread and on two
differ by 1e-6: rounding, which AdamW magnifies where gradients are tiny). The ranks also report what the plan split (so a plan that split nothing cannot pass), save their weights with
torch.distributed.checkpoint (loaded back here, unsplit), and the errors for a degree that does not divide the
heads, for absorbed MLA and for an FP8 model. The slow tests: tp=4, and tensor parallelism under fully_shard on a
dp_shard x tp mesh.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard

from dist_harness import run_ranks
from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.parallel.tensor import check_tensor_parallel

STEPS = 10
GAMMA = 0.01  # bias update speed: ten times V3's, so that ten steps move the bias by up to 0.1
TINY = dict(n_layers=2, n_dense_layers=1, n_mtp_modules=1)  # one dense block, one MoE block, one MTP (MoE) block
NO_QUERY_LORA = dict(TINY, q_lora_rank=0)


def _batches(cfg: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(STEPS)]
    return [(s[:, :-1], s[:, 1:]) for s in seqs]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _train(overrides: dict, mesh=None) -> tuple[dict, torch.nn.Module]:
    """Builds the tiny model (seed 0), splits it over `mesh` where given, and trains it STEPS steps. Returns what
    the test compares, and the model."""
    from seekforge.model.transformer import Transformer
    from seekforge.parallel.tensor import apply_tensor_parallel
    from seekforge.train.balance import update_expert_bias
    from seekforge.train.optim import build_adamw

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(**overrides))
    if mesh is not None:
        apply_tensor_parallel(model, mesh)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    out = {"losses": []}
    for step, (tokens, labels) in enumerate(_batches(model.cfg)):
        loss = model.loss(tokens, labels, mtp_weight=0.3, balance_alpha=0.01)
        loss.loss.backward()
        if step == 0:
            out["parts"] = {k: getattr(loss, k).item() for k in ("loss", "main_loss", "mtp_loss", "balance_loss")}
            out["load"] = {layer: load.clone() for layer, load in loss.expert_load.items()}
            out["grads"] = {name: _full(p.grad) for name, p in model.named_parameters()}
        out["losses"].append(loss.loss.item())
        opt.step()
        opt.zero_grad()
        update_expert_bias(model.moe_layers(), loss.expert_load, GAMMA)
    out["state"] = {name: _full(t) for name, t in model.state_dict().items()}
    return out, model


def _tp_rank(runs: dict, checkpoint: str) -> dict:
    """One rank: trains the split model of each of `runs` (name -> overrides) and reports, for each, what it
    computed, its layout (which parameters are DTensors, how placed, how large here) and its parameter names; saves
    the last with DCP under `checkpoint`; and the errors of a degree that does not divide the heads and of absorbed
    MLA."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from seekforge.fp8.convert import convert_to_fp8
    from seekforge.model.backend import Backend
    from seekforge.model.transformer import Transformer
    from seekforge.parallel.tensor import apply_tensor_parallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    out = {"absorbed_error": None, "degree_error": None, "fp8_error": None}
    for name, overrides in runs.items():
        out[name], model = _train(overrides, mesh)
        out[name]["split"] = {n: (p.placements, tuple(p.to_local().shape))
                              for n, p in model.named_parameters() if isinstance(p, DTensor)}
        out[name]["names"] = [n for n, _ in model.named_parameters()]
    dcp.save(model.state_dict(), checkpoint_id=checkpoint)
    try:
        model(torch.zeros(1, 4, dtype=torch.long), backend=Backend(absorbed=True))
    except ConfigError as err:
        out["absorbed_error"] = str(err)
    try:
        apply_tensor_parallel(Transformer(model.cfg.replace(n_heads=3)), mesh)
    except ConfigError as err:
        out["degree_error"] = str(err)
    try:
        apply_tensor_parallel(convert_to_fp8(Transformer(model.cfg)), mesh)
    except ConfigError as err:
        out["fp8_error"] = str(err)
    return out


def _dp_tp_rank(overrides: dict) -> dict:
    """One rank of a 2-D mesh, dp_shard=2 x tp=2: tensor parallelism first, then fully_shard of every block and of
    the root along dp (as torchtitan orders them); each dp rank takes its half of the first batch. Returns the loss
    averaged over the ranks and every gradient gathered whole, and the error for passing the 2-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from seekforge.model.transformer import Transformer
    from seekforge.parallel.tensor import apply_tensor_parallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    mesh_error = None
    try:
        apply_tensor_parallel(Transformer(ModelConfig.preset("tiny").replace(**overrides)), mesh)
    except ValueError as err:
        mesh_error = str(err)
    torch.manual_seed(0)
    model = apply_tensor_parallel(Transformer(ModelConfig.preset("tiny").replace(**overrides)), mesh["tp"])
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    register_fsdp_forward_method(model, "loss")  # the trainers call loss, not forward
    tokens, labels = _batches(model.cfg)[0]
    half = slice(mesh["dp_shard"].get_local_rank(), None, 2)
    loss = model.loss(tokens[half], labels[half], mtp_weight=0.3, balance_alpha=0.01).loss
    loss.backward()  # FSDP averages the gradients over dp: the mean loss's over the whole batch
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"loss": total.item() / dist.get_world_size(), "mesh_error": mesh_error,
            "grads": {name: _full(p.grad) for name, p in model.named_parameters()}}


def _close(actual: torch.Tensor | float, expected: torch.Tensor | float, what: str, rtol: float = 1e-5) -> None:
    """Relative error ||actual - expected|| / ||expected|| within rtol. (Entrywise it means nothing where an entry
    is rounding noise: a weight whose gradients are ~1e-9 moves by AdamW's lr either way.)"""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).norm().item(), expected.norm().item()
    assert err <= rtol * scale, f"{what}: error {err:.3g} against norm {scale:.3g}"


def _check_against_one_process(result: dict, reference: dict) -> None:
    for key, value in reference["parts"].items():
        _close(result["parts"][key], value, key)
    assert result["load"].keys() == reference["load"].keys()
    for layer, load in reference["load"].items():
        assert torch.equal(result["load"][layer], load), f"expert load of layer {layer}"
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        _close(result["grads"][name], grad, f"gradient of {name}")
    for step, (got, want) in enumerate(zip(result["losses"], reference["losses"], strict=True)):
        _close(got, want, f"loss of step {step}")
    assert result["state"].keys() == reference["state"].keys()
    for name, value in reference["state"].items():
        _close(result["state"][name], value, f"{name} after {STEPS} steps")


def _split_as_planned(split: dict, tp: int, cfg: ModelConfig) -> None:
    """The per-head projections and the dense/shared MLPs are split, each rank holding 1/tp; nothing else is."""
    q = "attn.wq_b" if cfg.q_lora_rank else "attn.wq"
    mlps = {"layers.0": "ffn", "layers.1": "ffn.shared_experts", "mtp.0.block": "ffn.shared_experts"}
    h = cfg.n_heads // tp
    col, row = (Shard(0),), (Shard(1),)
    expected = {}
    for block, mlp in mlps.items():
        width = (cfg.inter_dim if mlp == "ffn" else cfg.n_shared_experts * cfg.moe_inter_dim) // tp
        expected.update({
            f"{block}.{q}.weight": (col, (h * cfg.qk_head_dim, cfg.q_lora_rank or cfg.dim)),
            f"{block}.attn.wkv_b.weight": (col, (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
            f"{block}.attn.wo.weight": (row, (cfg.dim, h * cfg.v_head_dim)),
            f"{block}.{mlp}.w1.weight": (col, (width, cfg.dim)),
            f"{block}.{mlp}.w3.weight": (col, (width, cfg.dim)),
            f"{block}.{mlp}.w2.weight": (row, (cfg.dim, width)),
        })
    assert split == expected


RUNS = {"query LoRA": TINY, "no query LoRA": NO_QUERY_LORA}


@pytest.fixture(scope="module")
def reference(one_thread):
    """The unsplit model of each run trained in this process."""
    runs = {name: _train(overrides)[0] for name, overrides in RUNS.items()}
    for run in runs.values():  # the bias update moved every gate's bias
        assert all(bias.abs().sum() > 0 for name, bias in run["state"].items() if name.endswith("gate.bias"))
    return runs


def _check_ranks(tp: int, runs: dict, reference: dict, checkpoint) -> None:
    from seekforge.model.transformer import Transformer

    ranks = run_ranks(_tp_rank, tp, runs=runs, checkpoint=str(checkpoint))
    for result in ranks:
        for name, overrides in runs.items():
            _check_against_one_process(result[name], reference[name])
            _split_as_planned(result[name]["split"], tp, ModelConfig.preset("tiny").replace(**overrides))
            assert result[name]["names"] == list(reference[name]["grads"])  # names unchanged
        assert "absorbed MLA" in str(result["absorbed_error"]) and "explicit path" in str(result["absorbed_error"])
        assert f"parallel.tp={tp} does not divide the model's n_heads=3" in str(result["degree_error"])
        assert "fp8 and parallel.tp > 1 do not combine" in str(result["fp8_error"])
    # the DCP checkpoint of the last run's split model loads, unsplit, into one process: the weights the ranks hold
    last = list(runs)[-1]
    fresh = Transformer(ModelConfig.preset("tiny").replace(**runs[last]))
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(checkpoint))
    for name, value in ranks[0][last]["state"].items():
        assert torch.equal(state[name], value), name


def test_tp2_trains_as_one_process(reference, tmp_path):
    _check_ranks(2, RUNS, reference, tmp_path / "dcp")


@pytest.mark.slow
def test_tp4_trains_as_one_process(reference, tmp_path):
    _check_ranks(4, {"query LoRA": TINY}, reference, tmp_path / "dcp")


def test_degree_must_divide_heads_and_split_widths():
    cfg = ModelConfig.preset("tiny")  # 4 heads, inter_dim 384, one shared expert of 64
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide the model's n_heads=4, "
                                          r"n_shared_experts \* moe_inter_dim=64: .* one of 1, 2, 4$"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ConfigError, match=r"n_shared_experts \* moe_inter_dim=6: .* one of 1, 2$"):
        check_tensor_parallel(cfg.replace(moe_inter_dim=6), 4)
    with pytest.raises(ConfigError, match=r"the model's inter_dim=10: .* one of 1, 2$"):
        check_tensor_parallel(cfg.replace(inter_dim=10), 4)
    check_tensor_parallel(cfg.replace(inter_dim=10, n_dense_layers=0), 4)  # no dense layer: its width is free
    check_tensor_parallel(cfg, 4)


@pytest.mark.slow
def test_composes_with_fully_shard_on_a_dp_tp_mesh(reference):
    ref = reference["query LoRA"]
    for result in run_ranks(_dp_tp_rank, 4, overrides=TINY):
        assert "takes the 1-D tp mesh, got a 2-D mesh; pass mesh['tp']" in str(result["mesh_error"])
        _close(result["loss"], ref["parts"]["loss"], "loss")
        assert result["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            _close(result["grads"][name], grad, f"gradient of {name}")

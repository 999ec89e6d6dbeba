"""Expert parallelism (seekforge.parallel.expert) on 2 and 4 gloo ranks against one process on the same tokens.

Every rank builds the same seeded model and takes its own slice of the same seeded batch; the test process runs
the unsharded model on the whole batch. The gradient rule under test: dense gradients averaged over the ranks by
hand, expert gradients as the ranks hold them, equal one process's gradients of the mean of the ranks' losses.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from dist_harness import run_ranks
from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.moe import MoE
from seekforge.model.transformer import Transformer
from seekforge.parallel.expert import apply_expert_parallel
from seekforge.train.balance import update_expert_bias

CFG = ModelConfig.preset("tiny").replace(n_layers=2, max_seq_len=64)  # one dense block, one MoE block, an MTP block
STEPS, BATCH, SEQ, LR, GAMMA, MTP, ALPHA = 10, 2, 16, 3e-3, 1e-3, 0.3, 1e-2
# AdamW's eps: with the default 1e-8 a gradient element that cancels to about zero steps by +-lr on the sign of its
# rounding noise (the gradients agree to 1e-6, the weights after a step to only 1e-3); at 1e-3, below the median
# gradient, the step stays a smooth function of the gradient and the comparison tests the gradients
EPS = 1e-3
BF16_TOL = 3e-2  # a few bf16 steps: under autocast, rounding differs where the gate weight scales a row


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """Equal within tol of want's largest magnitude."""
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape and err <= tol * max(scale, 1e-12), f"{what}: off by {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------- what every rank and the test process build
def _moe(ep: int, skewed: bool) -> MoE:
    torch.manual_seed(0)
    m = MoE(CFG)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    if skewed:  # every token picks experts of rank 0 only: the other ranks and most experts receive nothing
        m.gate.bias[:CFG.n_routed_experts // ep] = 10.0
    return m


def _layer_inputs(ep: int) -> list[torch.Tensor]:
    """Each rank's tokens, uneven counts."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5 + 3 * r, CFG.dim, generator=g) for r in range(ep)]


def _probe() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, CFG.dim)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def _batch(step: int, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, CFG.vocab_size, (ep * BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---------------------------------------------------------------- the ranks
def _on_ranks(ep: int, checkpoint: str) -> dict:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    out = {"layer": _layer_rank(mesh, skewed=False), "skewed": _layer_rank(mesh, skewed=True),
           "bf16": _layer_rank(mesh, skewed=False, bf16=True), "training": _train_rank(mesh, checkpoint)}
    out["errors"] = []
    # experts that do not divide; sharded already; deep experts
    for bad in (lambda: MoE(CFG.replace(n_routed_experts=2 * ep + 1, n_expert_groups=1, n_limited_groups=1)),
                lambda: apply_expert_parallel(MoE(CFG), mesh),
                lambda: MoE(CFG.replace(n_deep_experts=CFG.n_expert_groups))):
        try:
            apply_expert_parallel(bad(), mesh)
        except ConfigError as e:
            out["errors"].append(str(e))
    return out


def _layer_rank(mesh, skewed: bool, device: str = "cpu", bf16: bool = False) -> dict:
    """One forward and backward of this rank's tokens through the expert-parallel layer (under bf16 autocast
    where asked); its results on the CPU."""
    ep, rank = mesh.size(), dist.get_rank()
    m = _moe(ep, skewed).to(device)
    keys = list(m.state_dict())
    apply_expert_parallel(m, mesh)
    events = []  # the order of the forward's all-to-alls and the shared experts
    launch = dist.all_to_all_single

    class Logged:  # an asynchronous exchange's work, logging its wait
        def __init__(self, work):
            self.work = work

        def wait(self):
            events.append("wait")
            return self.work.wait()

    def logged(*args, **kwargs):
        events.append("all_to_all")
        work = launch(*args, **kwargs)
        return Logged(work) if kwargs.get("async_op") else work

    dist.all_to_all_single = logged
    m.shared_experts.register_forward_hook(lambda *_: events.append("shared"))
    x = _layer_inputs(ep)[rank].to(device).requires_grad_()
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
        y, routing = m(x)
    dist.all_to_all_single = launch
    (y.float() * _probe().to(device)).sum().backward()
    grads = {name: p.grad for name, p in m.named_parameters()}
    full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))  # a collective
    out = {"y": y.detach(), "scores": routing.scores, "indices": routing.indices, "load": routing.load,
           "x_grad": x.grad, "events": events, "keys": list(m.state_dict()) == keys,
           "dense": {n: g for n, g in grads.items() if not isinstance(g, DTensor)},
           "experts": {n: g.to_local() for n, g in grads.items() if isinstance(g, DTensor)},
           "full": full if rank == 0 else None}
    return _to_cpu(out)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _train_rank(mesh, checkpoint: str) -> dict:
    ep, rank = mesh.size(), dist.get_rank()
    model = apply_expert_parallel(_model(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        tokens, labels = _batch(step, ep)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        out = model.loss(tokens[mine], labels[mine], mtp_weight=MTP, balance_alpha=ALPHA)
        out.loss.backward()
        for p in model.parameters():  # dense gradients: the mean over the (data-parallel) ep ranks
            if not isinstance(p, DTensor):
                dist.all_reduce(p.grad)
                p.grad /= ep
        opt.step()
        opt.zero_grad()
        loads = {layer: load.clone() for layer, load in out.expert_load.items()}
        for load in loads.values():
            dist.all_reduce(load)
        update_expert_bias(model.moe_layers(), loads, GAMMA)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / ep)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    dcp.save(model.state_dict(), checkpoint_id=checkpoint)
    return {"losses": losses, "full": full if rank == 0 else None}


def _with_fsdp() -> dict:
    """4 ranks, dp_shard=4 with ep=2 inside it: FSDP2 shards the dense weights over all 4 ranks and each expert
    slice over the 2 ranks that hold it (dp_shard_mod_ep), both with FSDP2's default mean; one step's gradients."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard_mod_ep", "ep"))
    dense = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
    model = apply_expert_parallel(_model(), mesh["ep"])
    for moe in model.moe_layers().values():  # before the blocks, which then leave the experts' weights alone
        fully_shard(moe.experts, mesh=mesh["dp_shard_mod_ep"])
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=dense)
    fully_shard(model, mesh=dense)
    register_fsdp_forward_method(model, "loss")
    rank = dist.get_rank()
    tokens, labels = _batch(0, 4)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    model.loss(tokens[mine], labels[mine], mtp_weight=MTP, balance_alpha=ALPHA).loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # a collective
    return grads if rank == 0 else None


# ---------------------------------------------------------------- the test process
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The single-process references are tiny: one thread, as each rank runs (OMP_NUM_THREADS=1), costs a tenth of
    the CPU time of several threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def ranks(request, tmp_path_factory):
    ep = request.param
    checkpoint = str(tmp_path_factory.mktemp(f"ep{ep}"))
    return ep, run_ranks(_on_ranks, ep, timeout=120, ep=ep, checkpoint=checkpoint), checkpoint


def _check_layer(ep: int, got: list[dict], skewed: bool, device: str = "cpu", bf16: bool = False,
                 tol: float = 1e-5) -> None:
    m = _moe(ep, skewed).to(device)
    xs = [x.to(device) for x in _layer_inputs(ep)]
    x = torch.cat(xs).requires_grad_()
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
        y, routing = m(x)
    ((y.float() * _probe().to(device)).sum() / ep).backward()  # the mean over ranks of each rank's loss
    _close(torch.cat([r["y"] for r in got]), y.detach(), "output", tol)
    _close(torch.cat([r["scores"] for r in got]), routing.scores, "scores", tol)
    assert torch.equal(torch.cat([r["indices"] for r in got]).sort(-1).values,
                       routing.indices.sort(-1).values.cpu())
    for r, xr in zip(got, xs):  # each rank's load: tokens per expert over its own tokens
        want = torch.bincount(m.gate(xr)[1].flatten(), minlength=CFG.n_routed_experts).float()
        assert torch.equal(r["load"], want.cpu())
    _close(torch.cat([r["x_grad"] for r in got]) / ep, x.grad, "input gradient", tol)
    for name, p in m.named_parameters():
        if name.startswith("experts."):  # each rank holds its experts' gradients, already the ranks' mean
            _close(torch.cat([r["experts"][name] for r in got]), p.grad, name, tol)
        else:
            _close(sum(r["dense"][name] for r in got) / ep, p.grad, name, tol)
    assert all(r["keys"] for r in got)
    full = got[0]["full"]
    assert full.keys() == m.state_dict().keys()
    for name, value in m.state_dict().items():  # the full state dict gathers the experts back to [E, out, in]
        assert torch.equal(full[name], value.cpu()), name


def test_moe_layer_matches_one_process(ranks):
    ep, got, _ = ranks
    _check_layer(ep, [r["layer"] for r in got], skewed=False)
    # counts, then the dispatch, the shared experts while it is in flight, then the combine
    assert got[0]["layer"]["events"] == ["all_to_all", "wait", "all_to_all", "shared", "wait", "all_to_all", "wait"]


def test_bf16_autocast(ranks):
    ep, got, _ = ranks
    _check_layer(ep, [r["bf16"] for r in got], skewed=False, bf16=True, tol=BF16_TOL)


def test_skewed_routing_with_idle_ranks_and_experts(ranks):
    ep, got, _ = ranks
    loads = sum(r["skewed"]["load"] for r in got)
    assert loads[CFG.n_routed_experts // ep:].sum() == 0
    _check_layer(ep, [r["skewed"] for r in got], skewed=True)
    for r in got[1:]:  # ranks that received no token still hold (zero) gradients for their experts
        assert all(g.abs().sum() == 0 for g in r["skewed"]["experts"].values())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load in one process, as meant
def test_training_matches_one_process(ranks):
    ep, got, checkpoint = ranks
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        out = model.loss(*_batch(step, ep), mtp_weight=MTP, balance_alpha=ALPHA)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        update_expert_bias(model.moe_layers(), out.expert_load, GAMMA)
        losses.append(out.loss.item())
    for r in got:
        assert r["training"]["losses"] == pytest.approx(losses, rel=1e-5)
    full = got[0]["training"]["full"]
    want = model.state_dict()
    assert full.keys() == want.keys()
    for name, value in want.items():
        _close(full[name], value, name)
    # the checkpoint saved at ep ranks loads into one process: torch.distributed.checkpoint reshards the experts
    resumed = _model().state_dict()
    dcp.load(resumed, checkpoint_id=checkpoint)
    for name, value in want.items():
        _close(resumed[name], value, name)


def test_errors_name_the_problem(ranks):
    ep, got, _ = ranks
    indivisible, twice, deep = got[0]["errors"]
    assert f"parallel.ep={ep} does not divide n_routed_experts={2 * ep + 1}" in indivisible
    assert "experts are sharded already: apply expert parallelism once" in twice
    assert "expert parallelism runs one-layer experts only" in deep


def test_fsdp2_default_mean_completes_the_expert_gradients():
    """The rule, composed with FSDP2 as the trainer applies it: no divide factor, no reduction over ep."""
    got = run_ranks(_with_fsdp, 4, timeout=120)[0]
    model = _model()
    model.loss(*_batch(0, 4), mtp_weight=MTP, balance_alpha=ALPHA).loss.backward()
    for name, p in model.named_parameters():
        _close(got[name], p.grad, name)


def _on_gpus(ep: int) -> dict:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (ep,))
    return {"fp32": _layer_rank(mesh, skewed=False, device="cuda"),
            "skewed": _layer_rank(mesh, skewed=True, device="cuda"),
            "bf16": _layer_rank(mesh, skewed=False, device="cuda", bf16=True)}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs two GPUs")
def test_nccl_on_two_gpus():
    """The same layer checks over NCCL, in fp32 and under bf16 autocast."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
    got = run_ranks(_on_gpus, 2, timeout=300, env={"CUDA_VISIBLE_DEVICES": visible}, ep=2)
    _check_layer(2, [r["fp32"] for r in got], skewed=False, device="cuda")
    _check_layer(2, [r["skewed"] for r in got], skewed=True, device="cuda")
    _check_layer(2, [r["bf16"] for r in got], skewed=False, device="cuda", bf16=True, tol=BF16_TOL)

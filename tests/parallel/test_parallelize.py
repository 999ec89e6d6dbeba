"""parallelize on one process: activation checkpointing recomputes each block in the backward, keeps far fewer
tensors for it, and changes neither the gradients nor the parameter names; torch.compile of pipeline stages (not
wired) is refused."""

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer
from seekforge.parallel.config import ParallelConfig
from seekforge.parallel.parallelize import parallelize


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _saved_matmuls_and_grads(model, tokens, labels):
    """Elements autograd keeps for the backward, matmuls run in the backward, and the gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Matmuls.count += func in MATMULS or func.name() == "aten::_grouped_mm"
            return func(*args, **(kwargs or {}))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model.loss(tokens, labels, mtp_weight=0.3, balance_alpha=1e-4)
    with Matmuls():
        out.loss.backward()
    return sum(saved), Matmuls.count, {name: p.grad for name, p in model.named_parameters()}


def _checkpointed(mode, plain):
    model = Transformer(plain.cfg)
    model.load_state_dict(plain.state_dict())
    parallelize(model, None, ParallelConfig(activation_checkpointing=mode).resolve(1))
    assert model.state_dict().keys() == plain.state_dict().keys()
    return model


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    """Full checkpointing keeps the blocks' inputs only and runs their forward again in the backward, matmuls
    included; selective keeps the matmuls' outputs as well (torch's own storage) and recomputes none of them;
    neither changes a gradient."""
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    full, selective = _checkpointed(True, plain), _checkpointed("selective", plain)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)
    kept_plain, matmuls_plain, grads_plain = _saved_matmuls_and_grads(plain, tokens, labels)
    kept_full, matmuls_full, grads_full = _saved_matmuls_and_grads(full, tokens, labels)
    kept_selective, matmuls_selective, grads_selective = _saved_matmuls_and_grads(selective, tokens, labels)
    assert kept_full < kept_plain / 2  # the blocks' inputs only, where the plain model keeps every intermediate
    assert kept_selective == kept_full
    assert matmuls_selective == matmuls_plain < matmuls_full
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_full[name], g, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads_selective[name], g, rtol=0, atol=0, msg=name)


def test_activation_checkpointing_takes_true_false_or_selective():
    with pytest.raises(ConfigError, match='parallel.activation_checkpointing must be true, false or "selective"'):
        ParallelConfig(activation_checkpointing="full").resolve(1)


def test_compiled_pipeline_stages_are_refused():
    layout = ParallelConfig(dp_shard=1, pp=2)  # as resolved on two ranks
    with pytest.raises(ConfigError, match="compile=true with parallel.pp > 1: torch.compile of pipeline stages"):
        parallelize(Transformer(ModelConfig.preset("tiny")), None, layout, compile=True)


def _bytes_written_per_step(distributed: bool) -> tuple[int, int, list[bool]]:
    """One rank (gloo): the bytes every op of a warm training step (forward + backward) of a bf16 tiny model
    writes, plain or through parallelize's FSDP2 over the one-rank mesh; the parameters' bytes; which blocks are
    gathered between the forward and the backward."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    from seekforge.model.transformer import default_dtype
    from seekforge.parallel.mesh import build_mesh, init_distributed

    class Written(TorchDispatchMode):
        """Counts the bytes ops write: the arguments they mutate, else the results that alias no input (not the
        views, nor the allocations of empty tensors)."""
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            schema = func._schema
            given = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
            written = [v for a, v in zip(schema.arguments, given) if a.alias_info is not None and a.alias_info.is_write]
            if not written and not func.name().startswith("aten::empty"):
                results = out if isinstance(out, (tuple, list)) else (out,)
                written = [t for r, t in zip(schema.returns, results) if r.alias_info is None]
            for w in written:
                for t in w if isinstance(w, (tuple, list)) else (w,):
                    if isinstance(t, torch.Tensor):
                        Written.total += t.numel() * t.element_size()
            return out

    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = Transformer(ModelConfig.preset("tiny").replace(n_mtp_modules=0))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if distributed:
        layout = ParallelConfig().resolve(1)
        init_distributed(torch.device("cpu"))
        parallelize(model, build_mesh(layout, "cpu"), layout)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 32))

    gathered = []  # per block, between the forward and the backward: whether its parameters are whole tensors

    def step():
        loss = model.loss(tokens, torch.roll(tokens, -1, dims=1)).loss
        gathered[:] = [not isinstance(block.attn_norm.weight, DTensor) for block in model.layers]
        loss.backward()
        for p in model.parameters():
            p.grad = None

    step()
    with Written():
        step()
    return Written.total, params, gathered


def test_fsdp2_on_one_rank_writes_each_bf16_parameter_fewer_than_four_times_a_step():
    """Where FSDP2 has nothing to gather (one rank) what it adds to a step is its copies, each writing the
    parameters' bytes once: the gathered copy in the forward, again in the backward for all but the last block and
    the root (which stay gathered), and the reduction's copy in and out; no cast into and out of an fp32 reduction
    buffer when the parameters and their gradients are bf16 and no mixed precision asks for it (that would write
    five parameters' bytes where the two bf16 copies write two)."""
    from dist_harness import run_ranks

    plain, params, _ = _bytes_written_per_step(distributed=False)
    [(sharded, _, gathered)] = run_ranks(_bytes_written_per_step, 1, distributed=True)
    assert gathered == [False] * (len(gathered) - 1) + [True]  # the last block's backward follows at once
    assert 2 * params < sharded - plain < 4 * params, f"{(sharded - plain) / params:.2f} parameters' bytes"

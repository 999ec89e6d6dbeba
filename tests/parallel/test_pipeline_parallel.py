"""Pipeline parallelism (seekforge.parallel.pipeline) against one process: a tiny MoE + MTP model (4 layers, fp32)
trained 10 AdamW steps with the auxiliary-loss-free bias update, on gloo ranks under torch's schedules, gives the
per-step losses, the first step's gradients and the final weights of `Transformer.loss` on the whole batch in one
process; its checkpoint (torch.distributed.checkpoint) loads into the unsplit model."""

import pytest
import torch

from dist_harness import run_ranks
from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer
from seekforge.parallel.pipeline import PipelineModel, stage_layers, stage_split

STEPS, BATCH, SEQ, N_MICRO = 10, 4, 16, 4  # more micro-batches than stages at pp=2
LR, GAMMA, ALPHA = 3e-3, 0.01, 0.01
TOL = 1e-5


def _config(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(n_layers=4, dim=64, vocab_size=128, **changes)


def _model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(_config(**changes))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 128, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def _eval_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches' rows (another shape than training's), the first 5 positions of half the rows untrained: the
    loss is a mean over targets, not over micro-batches."""
    (t0, l0), (t1, l1) = _batches()[:2]
    labels = torch.cat([l0, l1]).clone()
    labels[::2, :5] = -100
    return torch.cat([t0, t1]), labels


def _mtp_weight(step: int) -> float:
    return 0.3 if step < STEPS - 2 else 0.0  # the last steps without MTP: its embeddings get a zero gradient


def _optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    from seekforge.train.optim import build_adamw

    return build_adamw(module, LR, 0.1, (0.9, 0.95))


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _train_pipeline(pp: int, runs: list[tuple[str, int | None]], ckpt: str | None, autocast: bool = False):
    """Runs on each of pp ranks: for each (schedule, stages per rank) of `runs`, 10 steps of the pipeline from the
    same start; per run, this rank's losses, first gradients, final weights, evaluation. The first run's model and
    optimizer state go to `ckpt` (torch.distributed.checkpoint). With `autocast`, last, one step's losses under
    bf16 autocast."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",))
    results = []
    for schedule, per_rank in runs:
        model = PipelineModel(_model(), mesh["pp"], schedule=schedule, n_microbatches=N_MICRO,
                              stages_per_rank=per_rank)
        results.append(_train_steps(model))
        if ckpt is not None and len(results) == 1:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            state, optimizer_state = get_state_dict(model, results[-1].pop("optimizer"))
            results[-1]["optimizer_keys"] = sorted(optimizer_state["state"])
            dcp.save({"model": state, "optimizer": optimizer_state}, checkpoint_id=ckpt)
        results[-1].pop("optimizer", None)
    if autocast:
        model = PipelineModel(_model(), mesh["pp"], schedule="1f1b", n_microbatches=N_MICRO, autocast=_bf16)
        results.append(model.step(*_batches()[0], mtp_weight=_mtp_weight(0), balance_alpha=ALPHA)[0])
    return results


def _train_steps(model: PipelineModel) -> dict:
    from seekforge.train.balance import update_expert_bias

    optimizer = _optimizer(model)
    losses, grads = [], None
    for step, (tokens, labels) in enumerate(_batches()):
        out, loads = model.step(tokens, labels, mtp_weight=_mtp_weight(step), balance_alpha=ALPHA)
        losses.append(out)
        if grads is None:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model.moe_layers(), loads, GAMMA)
    try:  # a batch the micro-batches do not divide: every rank refuses it before any communication
        model.step(tokens[:3], labels[:3])
        refused = None
    except ConfigError as e:
        refused = str(e)
    return {"losses": losses, "grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "refused": refused, "evaluated": model.evaluate(*_eval_batch()), "moe_layers": sorted(model.moe_layers()),
            "optimizer": optimizer}


def _train_reference():
    """One process: the first batch's losses and gradients of `Transformer.loss` over the whole batch, then the 10
    steps with the batch run as the pipeline's micro-batches, their gradients accumulated (LMTrainer's grad_accum):
    the same mean loss, and the trajectory to compare weights with. (Against whole-batch steps the weights differ
    by ~2e-5 after 10 steps: the micro-batches' rounding, 5e-7 in the gradients, which AdamW's normalisation
    amplifies in the smallest gradient elements; the pipeline itself adds ~3e-7.)"""
    from seekforge.model.moe import add_load
    from seekforge.train.balance import update_expert_bias

    keys = ("loss", "main_loss", "mtp_loss", "balance_loss")
    model = _model()
    tokens, labels = _batches()[0]
    whole = model.loss(tokens, labels, mtp_weight=_mtp_weight(0), balance_alpha=ALPHA)
    whole.loss.backward()
    first = {k: float(getattr(whole, k)) for k in keys}, {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    optimizer = _optimizer(model)
    losses = []
    for step, (tokens, labels) in enumerate(_batches()):
        sums, loads = dict.fromkeys(keys), {}
        for rows in zip(tokens.chunk(N_MICRO), labels.chunk(N_MICRO)):
            out = model.loss(*rows, mtp_weight=_mtp_weight(step), balance_alpha=ALPHA)
            (out.loss / N_MICRO).backward()
            for k in keys:
                if getattr(out, k) is not None:
                    sums[k] = (sums[k] or 0.0) + float(getattr(out, k)) / N_MICRO
            add_load(loads, out.expert_load)
        losses.append(sums)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(model.moe_layers(), loads, GAMMA)
    with torch.no_grad():
        evaluated = float(model.loss(*_eval_batch()).main_loss)
    return {"first": first, "losses": losses, "state": model.state_dict(), "evaluated": evaluated,
            "autocast": _autocast_reference()}


def _autocast_reference() -> float:
    """The first step's loss under bf16 autocast, in one process over the pipeline's micro-batches (the same
    shapes, so the same bf16 rounding)."""
    model = _model()
    with torch.no_grad(), _bf16():
        return sum(float(model.loss(*rows, mtp_weight=_mtp_weight(0), balance_alpha=ALPHA).loss)
                   for rows in zip(*(t.chunk(N_MICRO) for t in _batches()[0]))) / N_MICRO


@pytest.fixture(scope="module")
def reference(one_thread):
    return _train_reference()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Relative error of the whole tensor, |a - b| / |b| (elementwise it is meaningless near 0)."""
    return float((a - b).norm()) <= TOL * max(float(b.norm()), 1e-12)


def _same_losses(got: dict, want: dict) -> bool:
    return all(got[k] is None if v is None else got[k] == pytest.approx(v, rel=TOL) for k, v in want.items())


def _check(results, reference) -> None:
    first_losses, first_grads = reference["first"]
    for rank_result in results:  # every rank reports the step's losses
        assert _same_losses(rank_result["losses"][0], first_losses), "first step against the whole batch"
        for step, (got, want) in enumerate(zip(rank_result["losses"], reference["losses"])):
            assert _same_losses(got, want), f"step {step}: {got} != {want}"
        assert "does not split into" in rank_result["refused"]
        assert rank_result["evaluated"] == pytest.approx(reference["evaluated"], rel=TOL)
    want = reference["state"]
    assert sorted(k for r in results for k in r["state"]) == sorted(want), \
        "every parameter on exactly one rank, under its name"
    grads = {k: g for r in results for k, g in r["grads"].items()}
    assert grads.keys() == first_grads.keys()
    bad = [k for k in first_grads if not _close(grads[k], first_grads[k])]
    assert not bad, f"first step's gradients differ from the whole batch's: {bad}"
    state = {k: v for r in results for k, v in r["state"].items()}
    bad = [k for k in want if not _close(state[k], want[k])]
    assert not bad, f"weights after {STEPS} steps differ from one process: {bad}"
    moe = sorted(layer for r in results for layer in r["moe_layers"])
    assert moe == sorted(_model().moe_layers()), "each MoE layer (main and MTP) on one rank"


def test_two_ranks_1f1b_and_interleaved_equal_one_process(reference, tmp_path):
    # 1F1B: 2 stages, 4 micro-batches; interleaved 1F1B: 4 stages, 2 a rank
    runs = run_ranks(_train_pipeline, 2, pp=2, runs=[("1f1b", None), ("interleaved_1f1b", 2)],
                     ckpt=str(tmp_path / "ckpt"), autocast=True)
    for run in zip(*(rank[:2] for rank in runs)):
        _check(run, reference)
    # the stages' forwards ran under the autocast they were given: bf16's loss (same shapes: 6e-8 apart), not
    # fp32's (2.4e-5 apart)
    for rank in runs:
        assert rank[2]["loss"] == pytest.approx(reference["autocast"], rel=1e-6)
        assert rank[2]["loss"] != pytest.approx(reference["first"][0]["loss"], rel=TOL)
    one_f_one_b = {k: v for rank in runs for k, v in rank[0]["state"].items()}
    # the pp=2 checkpoint holds the model's own names: it resumes the unsplit model (pp=1), optimizer included
    import torch.distributed.checkpoint as dcp

    fresh = _model()
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    fresh.load_state_dict(state["model"])
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, one_f_one_b[key]), key
    optimizer_keys = sorted(k for rank in runs for k in rank[0]["optimizer_keys"])
    assert optimizer_keys == sorted(k for k, _ in fresh.named_parameters())


@pytest.mark.slow
def test_four_ranks_gpipe_equal_one_process(reference):
    # 4 layers + 1 MTP module over 4 stages: [2, 1, 1, 1] units, the last stage holding only the MTP module
    _check([rank[0] for rank in run_ranks(_train_pipeline, 4, pp=4, runs=[("gpipe", None)], ckpt=None)], reference)


@pytest.mark.slow
def test_looped_bfs_and_zero_bubble_schedules_equal_one_process(reference):
    runs = run_ranks(_train_pipeline, 2, pp=2, runs=[("looped_bfs", 2), ("interleaved_zero_bubble", 2)], ckpt=None)
    for run in zip(*runs):
        _check(run, reference)


def _fsdp_pipeline_gradients() -> tuple[float, dict[str, torch.Tensor]]:
    """Runs on each of 4 ranks, pp=2 x dp=2: FSDP2 over dp on each block and each stage (the stage's root
    parameters: embedding, norms, head, MTP projections), each dp rank a half of the batch; this rank's loss and
    its parameters' whole gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    model = PipelineModel(_model(), mesh["pp"], schedule="1f1b", n_microbatches=2)
    for stage in model.stages:
        for block in stage.blocks():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(stage, mesh=mesh["dp"])
    tokens, labels = _batches()[0]
    rows = slice(mesh["dp"].get_local_rank() * BATCH // 2, (mesh["dp"].get_local_rank() + 1) * BATCH // 2)
    losses, _ = model.step(tokens[rows], labels[rows], mtp_weight=_mtp_weight(0), balance_alpha=ALPHA)
    return losses["loss"], {k: p.grad.full_tensor() for k, p in model.named_parameters()}


@pytest.mark.slow
def test_fsdp_on_each_stage_composes_with_the_pipeline(reference):
    results = run_ranks(_fsdp_pipeline_gradients, 4)
    first_losses, first_grads = reference["first"]
    # each dp rank's loss is its rows' (the mean over dp ranks is the batch's); FSDP averages the gradients
    assert sum(loss for loss, _ in results) / 4 == pytest.approx(first_losses["loss"], rel=TOL)
    grads = {k: g for _, rank_grads in results for k, g in rank_grads.items()}
    assert grads.keys() == first_grads.keys()
    bad = [k for k in first_grads if not _close(grads[k], first_grads[k])]
    assert not bad, f"gradients differ from the whole batch's: {bad}"


# ---------------------------------------------------------------- the split, by hand
def test_stage_split_is_balanced_with_the_remainder_first():
    assert stage_split(5, 2) == [3, 2]
    assert stage_split(5, 4) == [2, 1, 1, 1]
    assert stage_split(62, 16) == [4] * 14 + [3] * 2  # DeepSeek-V3: 61 layers + 1 MTP module


def test_stage_layers_put_the_mtp_modules_on_the_last_stage():
    model = _model()  # units: layers 0-3, MTP module (unit 4)
    assert stage_layers(model, 2) == [range(0, 3), range(3, 4)]
    assert stage_layers(model, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 4)]  # last: MTP alone
    with pytest.raises(ConfigError, match="between 2 and 5"):
        stage_layers(model, 6)
    two_mtp = _model(n_mtp_modules=2)  # 6 units over 4 stages: [2, 2, 1, 1] leaves one MTP module on stage 2
    with pytest.raises(ConfigError, match="MTP"):
        stage_layers(two_mtp, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="pipedream"), "unknown pipeline schedule"),
    (dict(schedule="1f1b", stages_per_rank=2), "runs one stage per rank"),
    (dict(schedule="interleaved_1f1b", stages_per_rank=1), "runs two or more stages"),
    (dict(schedule="zbv_zero_bubble"), "unknown pipeline schedule"),
    (dict(schedule="1f1b", n_microbatches=-1), "n_microbatches must be >= 1"),
])
def test_bad_settings_are_refused_before_any_communication(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PipelineModel(_model(), None, **kwargs)


def test_tied_embeddings_are_refused():
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        PipelineModel(_model(tie_word_embeddings=True), None)

"""Data, expert and tensor parallelism (FSDP2, HSDP, ep, tp and their combinations) through the real pretraining
trainer on gloo ranks, against one process on the same global batch: per-step losses, evaluation, final weights and
balancing biases; resharded resume; layout errors."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_harness import run_ranks
from seekforge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
SMALL = ["seq_len=32", "batch_size=8", f"steps={STEPS}", "warmup_steps=2", "constant_steps=4", "decay_steps=4",
         "precision=fp32", "progress=false", "tensorboard=false", "eval_every=5", "save_every=5", "eval_batches=1",
         "model_overrides={dim: 64, inter_dim: 128, moe_inter_dim: 32, n_layers: 2}"]
RTOL = 1e-5


def _config(data, *extra):
    from seekforge.train.pretrain import load_train_config

    return load_train_config("tiny", [*SMALL, f"data={data}", f"tokenizer={Path(data) / 'tokenizer'}", *extra])


def _result(trainer, out) -> dict:
    """What a run ends with (on every rank; the weights whole on rank 0 only): losses by step, evaluations, the final
    weights and the balancing biases of the rank's MoE layers by layer id (a pipeline stage's only)."""
    from seekforge.parallel.parallelize import gathered

    model = gathered(trainer.model, trainer.mesh)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()] if trainer.main else []
    return {"losses": {r["step"]: r["loss"] for r in rows}, "grad_norms": {r["step"]: r["grad_norm"] for r in rows},
            "evals": {r["step"]: r["eval_loss"] for r in rows
                                                                      if "eval_loss" in r},
            "weights": None if model is None else {k: v.clone() for k, v in model.state_dict().items()},
            "bias": {layer: m.gate.bias.clone() for layer, m in trainer.model.moe_layers().items()}}


def _train(out, data, overrides, resume=False, stop=None):
    """A pretraining run on this rank, exported to DIR/final; with `stop`, the loop ends after that many updates
    (as a run killed right after its checkpoint there)."""
    from seekforge.train.pretrain import build_trainer

    trainer = build_trainer(_config(data, *overrides), out, resume=resume)
    if stop is None:
        trainer.run(report=False)
    else:
        trainer.loop.cfg = copy.copy(trainer.cfg)  # the loop's count only: the schedule stays the run's
        trainer.loop.cfg.steps = stop
        trainer.train()
    return _result(trainer, out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from seekforge.data.corpus import build_builtin_dataset

    path = tmp_path_factory.mktemp("data")
    build_builtin_dataset(path, n_docs=300, seed=0, vocab_size=300, progress=False)
    return path


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, no torchrun."""
    return _train(tmp_path_factory.mktemp("single"), data, [])


def _assert_close(got: dict, want: dict) -> None:
    assert sorted(got["losses"]) == list(range(STEPS))
    for step, loss in want["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=RTOL), f"step {step}"
        assert got["grad_norms"][step] == pytest.approx(want["grad_norms"][step], rel=RTOL), f"step {step}"
    assert got["evals"] == pytest.approx(want["evals"], rel=RTOL)
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        err = float((got["weights"][name] - w).norm() / w.norm().clamp(min=1e-12))
        assert err < RTOL, f"{name}: relative error {err:.2e}"
    _assert_same_bias(got, want)


def _assert_same_bias(got: dict, want: dict) -> None:
    assert got["bias"]
    for layer, bias in got["bias"].items():
        assert torch.equal(bias, want["bias"][layer]), f"layer {layer}"


@pytest.mark.parametrize("world, layout", [
    (2, ["parallel.dp_shard=2", "parallel.activation_checkpointing=true"]),
    pytest.param(4, ["parallel.dp_shard=4"], marks=pytest.mark.slow),
    pytest.param(4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], marks=pytest.mark.slow),
    (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    (2, ["parallel.tp=2"]),
    pytest.param(4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.ep=2"], marks=pytest.mark.slow),
    (2, ["parallel.pp=2"]),
    pytest.param(4, ["parallel.dp_shard=2", "parallel.pp=2", "parallel.ep=2"], marks=pytest.mark.slow),
], ids=["fsdp2-checkpointed", "fsdp4", "hsdp2x2", "fsdp2-ep2", "tp2", "fsdp2-tp2-ep2", "pp2", "fsdp2-pp2-ep2"])
def test_parallel_training_matches_one_process(data, single, tmp_path, world, layout):
    ranks = run_ranks(_train, world, out=tmp_path / "run", data=data, overrides=layout)
    _assert_close(ranks[0], single)
    for other in ranks[1:]:  # every rank balanced with the global load: the one process's bias everywhere
        _assert_same_bias(other, single)
    assert (tmp_path / "run" / "checkpoints" / "step_00000010" / "shards" / ".metadata").is_file()
    from transformers import AutoModelForCausalLM  # the export, gathered from the shards, loads in transformers

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").num_parameters() > 0


@pytest.mark.slow
def test_resume_at_other_layouts_continues_the_losses(data, single, tmp_path):
    """Saved at 4 ranks after 5 steps with expert parallelism (dp_shard=4, ep=2: ep is carved out of dp_shard, so
    on 4 ranks without tp or pp this is the layout with ep=2; each expert slice is FSDP-sharded over 2 ranks),
    resumed at 2 ranks with ep (dp_shard=2, ep=2: the experts' shards regrouped), at 2 ranks without ep (dp_shard=2:
    every expert sharded by FSDP2 alone) and at 1 process."""
    run_ranks(_train, 4, out=tmp_path / "four", data=data, overrides=["parallel.dp_shard=4", "parallel.ep=2"], stop=5)
    assert json.loads((tmp_path / "four" / "checkpoints" / "step_00000005" / "meta.json").read_text())["format"] == 2
    resumes = {"two_ep": ["parallel.dp_shard=2", "parallel.ep=2"], "two": ["parallel.dp_shard=2"], "one": None}
    for name, layout in resumes.items():
        shutil.copytree(tmp_path / "four", tmp_path / name)
        if layout is None:
            resumed = _train(tmp_path / name, data, [], resume=True)
        else:
            resumed = run_ranks(_train, 2, out=tmp_path / name, data=data, overrides=layout, resume=True)[0]
        _assert_close(resumed, single)


def test_pipelined_run_resumes_in_one_process(data, single, tmp_path):
    """Saved at pp=2 after 5 steps (each rank its stage's parameters and optimizer state under the model's names),
    resumed by one process."""
    run_ranks(_train, 2, out=tmp_path / "run", data=data, overrides=["parallel.pp=2"], stop=5)
    _assert_close(_train(tmp_path / "run", data, [], resume=True), single)


def test_degrees_must_multiply_to_the_world_size(data, tmp_path):
    with pytest.raises(ConfigError, match=r"dp_replicate\*dp_shard\*tp\*pp = 1\*2\*1\*1 = 2 but the world size "
                                          r"\(torchrun's WORLD_SIZE; 1 without torchrun\) is 1"):
        _train(tmp_path / "run", data, ["parallel.dp_shard=2"])


def test_the_global_batch_must_divide_by_the_data_parallel_ranks(data, tmp_path):
    with pytest.raises(AssertionError, match="batch_size 3 .* does not divide by the 2 data-parallel ranks"):
        run_ranks(_train, 2, out=tmp_path / "run", data=data, overrides=["batch_size=3"])


def _sft(out, data, base, overrides):
    """An SFT run (logit distillation from `base` included) on this rank; its per-step records (rank 0's)."""
    from seekforge.train.sft import build_trainer, load_sft_config

    cfg = load_sft_config(None, [f"init_from={base}", f"data={data}", "seq_len=256", "batch_size=4", "steps=4",
                                 "warmup_steps=1", "constant_steps=1", "decay_steps=2", "lr=3e-3", "precision=fp32",
                                 "eval_every=2", "save_every=4", "val_fraction=0.2", "progress=false",
                                 "tensorboard=false", f"teacher={base}", "kd_weight=0.5", *overrides])
    trainer = build_trainer(cfg, out)
    trainer.train()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()] if trainer.main else []
    return rows


def test_sft_with_distillation_matches_one_process(tiny_checkpoint, tmp_path):
    """SFT trains on completions only: the ranks' rows hold different numbers of trained tokens (and of MTP
    targets), which each term's weight accounts for."""
    from seekforge.tasks import get_task, r1_zero_prompt

    rows = get_task("chain_sum").rows("train", 24, 0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": r1_zero_prompt(r.prompt), "completion": "\n" + r.solution})
                            + "\n" for r in rows))
    base = tiny_checkpoint()
    want = _sft(tmp_path / "one", data, base, [])
    got = run_ranks(_sft, 2, out=tmp_path / "two", data=data, base=base, overrides=["parallel.dp_shard=2"])[0]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for a, b in zip(got, want):
        assert not a["skipped"]
        for key in ("loss", "main_loss", "mtp_loss", "balance_loss", "grad_norm", "eval_loss"):
            assert (key in a) == (key in b)
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=RTOL), (a["step"], key)


def test_torchrun_command_line(data, tmp_path):
    """`torchrun --nproc-per-node 2 -m seekforge train ...` on gloo: one report of the run, from rank 0."""
    import os
    import subprocess
    import sys

    from dist_harness import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "seekforge", "train", "--config", "tiny", "--out", str(tmp_path / "run"), *SMALL, "steps=2",
           "warmup_steps=1", "constant_steps=1", "decay_steps=0", f"data={data}", f"tokenizer={data / 'tokenizer'}",
           "parallel.dp_shard=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done: loss") == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file() and (tmp_path / "run" / "report.md").is_file()

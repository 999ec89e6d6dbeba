"""Pretraining: exact resume after SIGKILL, loss falls, balancing evens out load, clear errors."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seekforge import ConfigError, ModelConfig
from seekforge.model.gate import Gate
from seekforge.model.moe import MoE
from seekforge.train.balance import update_expert_bias
from seekforge.train.metrics import load_cv
from seekforge.train.checkpoint import CheckpointManager, rng_state
from seekforge.train.loop import TrainingStopped
from seekforge.train.pretrain import TrainConfig, build_trainer, load_train_config

SMALL_RUN = ["seq_len=32", "batch_size=4", "steps=14", "warmup_steps=2", "constant_steps=6", "decay_steps=6",
             "save_every=3", "eval_every=7", "eval_batches=1", "builtin_docs=400", "builtin_vocab=300",
             "progress=false", "tensorboard=false"]


def _train(out, *extra, resume=False):
    cmd = [sys.executable, "-m", "seekforge.cli", "train", "--config", "tiny", "--out", str(out), *SMALL_RUN, *extra]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    full = _train(tmp_path / "full")
    killed = _train(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill at an arbitrary step past the first checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(tmp_path / "killed", resume=True)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    full_out, full_err = full.communicate(timeout=300)
    assert full.returncode == 0, full_err
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(14))
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(14))  # no step logged twice across the kill
    assert got == want  # bit-identical, step by step
    # and the loss falls on the built-in corpus
    assert sum(want[s] for s in (11, 12, 13)) / 3 < want[0] - 1.5
    assert (tmp_path / "full" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "report.md").is_file()


def test_resume_into_another_configs_directory_is_refused(tmp_path):
    proc = _train(tmp_path / "run", "steps=3", "warmup_steps=1", "constant_steps=1", "decay_steps=1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    proc = _train(tmp_path / "run", "steps=3", "warmup_steps=1", "constant_steps=1", "decay_steps=1", "lr=1e-2",
                  resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "fingerprint" in err and "Traceback" not in err
    proc = _train(tmp_path / "run", "steps=3", "warmup_steps=1", "constant_steps=1", "decay_steps=1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "--resume" in err


def test_a_checkpoint_with_the_model_inside_state_pt_still_resumes(tmp_path):
    """Format 1 (the model and optimizer in state.pt, what single-process runs wrote before sharded checkpoints):
    a run resumed from it continues with the losses of the run that never stopped."""
    cfg = load_train_config("tiny", [*SMALL_RUN, "steps=4", "warmup_steps=1", "constant_steps=1", "decay_steps=2",
                                     "save_every=100"])
    build_trainer(cfg, tmp_path / "straight").train()
    first = build_trainer(cfg, tmp_path / "first")
    first.loop.cfg = copy.copy(cfg)  # the loop stops after two updates; the schedule stays the run's
    first.loop.cfg.steps = 2
    first.train()
    CheckpointManager(tmp_path / "old", fingerprint=cfg.fingerprint()).save(2, {
        "model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
        "loader": first.loader.state_dict(), "rng": rng_state(), "step": 2})
    resumed = build_trainer(cfg, tmp_path / "old", resume=True)
    assert resumed.step == 2
    resumed.train()
    want = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x)["loss"] for x in (tmp_path / "old" / "metrics.jsonl").read_text().splitlines()]
    assert got == want[2:]


def test_wrong_config_key_and_type():
    with pytest.raises(ConfigError, match="valid"):
        load_train_config("tiny", ["learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="steps"):
        load_train_config("tiny", ["steps=many"])
    with pytest.raises(ConfigError, match="exceed steps"):
        load_train_config("tiny", ["steps=10"])


def test_document_rows_need_a_known_layout_and_the_curriculum_needs_them():
    with pytest.raises(ConfigError, match="rows must be 'packed' or 'documents'"):
        load_train_config("tiny", ["rows=docs"])
    with pytest.raises(ConfigError, match="set rows=documents"):
        load_train_config("tiny", ["curriculum_steps=10"])
    assert load_train_config("passkey").rows == "documents"


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, monkeypatch):
    cfg = load_train_config("tiny", [*SMALL_RUN, "max_bad_steps=3"])
    trainer = build_trainer(cfg, tmp_path)
    real_loss = trainer.model.loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "loss", flaky)
    with pytest.raises(TrainingStopped, match="3 non-finite steps"):
        trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False] * 4 + [True] * 3
    assert trainer.ckpt.load_latest()[0] == 3  # the last good checkpoint survives


def test_a_fresh_start_drops_the_records_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    """The directory holds records but no checkpoint: starting again replaces them, it does not append."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 99.0}\n{"step": 1, "loss": 98.0}\n{"step": 2, "lo')
    cfg = load_train_config("tiny", [*SMALL_RUN, "steps=2", "warmup_steps=1", "constant_steps=1", "decay_steps=0"])
    build_trainer(cfg, tmp_path).train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["loss"] < 90 for r in rows)


@pytest.mark.parametrize("switch", [0, 1], ids=["mtp-never-runs", "mtp-stops-after-a-step"])
def test_mtp_weight_zero_trains_and_moves_only_the_biases_of_layers_that_ran(tmp_path, switch):
    """MTP's weight 0 from `switch` on (its modules skip the forward): every step trains, with the sequence-wise
    balance loss on; the bias update moves the main MoE layers' gate bias every step, the MTP block's only in the
    steps it ran, and the step's record has no load for a layer that did not run."""
    cfg = load_train_config("tiny", [*SMALL_RUN, "steps=3", "warmup_steps=1", "constant_steps=1", "decay_steps=1",
                                     "mtp_weight=0.3", "mtp_weight_late=0", f"mtp_switch_step={switch}",
                                     "bias_update_speed=0.01", "balance_alpha=0.01", "eval_every=100",
                                     "save_every=100"])
    trainer = build_trainer(cfg, tmp_path)
    model = trainer.model
    mtp_layer = model.cfg.n_layers  # the MTP block's MoE comes after the main layers'
    moes = {b.layer_id: b.ffn for b in [*model.layers, model.mtp[0].block] if isinstance(b.ffn, MoE)}
    main_layers = [layer for layer in moes if layer != mtp_layer]
    assert mtp_layer in moes and main_layers
    for step in range(cfg.steps):
        before = {layer: moe.gate.bias.clone() for layer, moe in moes.items()}
        record = trainer.train_step()
        trainer.step += 1
        assert not record["skipped"] and record["balance_loss"] > 0
        ran = step < switch
        assert (record["mtp_loss"] > 0) == ran
        for layer, moe in moes.items():
            moved = not torch.equal(moe.gate.bias, before[layer])
            assert moved == (layer in main_layers or ran), (step, layer)
        rows = dict(zip(moes, record["expert_load"]))
        assert (rows[mtp_layer] != []) == ran
        assert all(sum(rows[layer]) == cfg.batch_size * cfg.seq_len * model.cfg.n_activated_experts
                   for layer in main_layers)


def test_bias_balancing_evens_out_a_skewed_router():
    cfg = ModelConfig.preset("tiny").replace(n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(0)
    x = torch.randn(1024, cfg.dim) + 0.5

    def run(gamma, steps=600):
        gate = Gate(cfg)
        torch.nn.init.normal_(gate.weight, 0, 0.02)
        with torch.no_grad():
            gate.weight[:3] += 0.02  # experts 0-2 are favoured by every token
        for _ in range(steps):
            _, idx, _ = gate(x)
            load = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).float()
            update_expert_bias({0: type("M", (), {"gate": gate})()}, {0: load}, gamma)
        return float(load_cv(load))

    skewed, balanced = run(0.0), run(0.001)
    assert skewed > 0.8
    assert balanced < skewed / 4


def test_trainer_configs_declare_each_default_once():
    """A trainer's config extends the shared ones (LoopConfig, LMConfig) with its own fields; a field it declares
    again must set another default (fine-tuning's, GRPO's), never repeat the one it inherits."""
    import dataclasses

    from seekforge.rl.grpo import GRPOConfig
    from seekforge.train.lm import LMConfig
    from seekforge.train.loop import LoopConfig
    from seekforge.train.sft import SFTConfig

    def default(f):
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    for cls in (LMConfig, TrainConfig, SFTConfig, GRPOConfig):
        base = cls.__mro__[1]
        inherited = {f.name: default(f) for f in dataclasses.fields(base)}
        repeated = [name for name in cls.__dict__.get("__annotations__", {})
                    if name in inherited and default(cls.__dataclass_fields__[name]) == inherited[name]]
        assert not repeated, f"{cls.__name__} repeats {base.__name__}'s defaults of {repeated}"
    assert issubclass(SFTConfig, LMConfig) and not issubclass(SFTConfig, TrainConfig)  # no pretraining data fields
    assert LoopConfig in TrainConfig.__mro__ and LoopConfig in GRPOConfig.__mro__


def test_sft_names_the_pretraining_keys_it_does_not_take(tmp_path):
    """builtin_* describe pretraining's generated corpus; SFT reads its examples from --data."""
    from seekforge.train.sft import load_sft_config

    with pytest.raises(ConfigError, match="builtin_docs"):
        load_sft_config(None, ["builtin_docs=400"])

from __future__ import annotations

import errno
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from seekforge.errors import CheckpointError
from seekforge.train import checkpoint as ckpt_mod
from seekforge.train.checkpoint import CheckpointManager, config_fingerprint, rng_state, set_rng_state


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 4), value)}, "optimizer": {"step": int(value)}, "data": {"pos": [1, 2]}}


def _leftovers(manager: CheckpointManager) -> list[str]:
    return sorted(p.name for p in manager.dir.iterdir() if p.name.startswith("."))


def _assert_loads(manager: CheckpointManager, step: int, value: float) -> None:
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == step
    assert torch.equal(loaded[1]["model"]["w"], torch.full((4, 4), value))


def test_save_load_layout_and_meta(tmp_path):
    m = CheckpointManager(tmp_path, fingerprint="abc123")
    assert m.load_latest() is None
    path = m.save(10, _state(1.0))
    assert path == tmp_path / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 10 and meta["fingerprint"] == "abc123" and meta["time"].endswith("Z")
    assert (m.dir / "latest").read_text().strip() == "step_00000010"
    step, state = m.load_latest()
    assert step == 10 and state["optimizer"] == {"step": 1} and state["data"] == {"pos": [1, 2]}
    assert _leftovers(m) == []


def test_keep_last_n(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        m.save(step, _state(float(step)))
    assert m.steps() == [3, 4]
    _assert_loads(m, 4, 4.0)
    everything = CheckpointManager(tmp_path / "all", keep_last=None)
    for step in range(5):
        everything.save(step, _state(0.0))
    assert everything.steps() == [0, 1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_full_disk_during_state_write_keeps_previous(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path)
    m.save(100, _state(1.0))
    real_save = torch.save

    def save_then_fill_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    with pytest.raises(CheckpointError, match=r"step 200.*disk is full.*newest whole checkpoint is step_00000100.*free space"):
        m.save(200, _state(2.0))
    monkeypatch.undo()
    _assert_loads(m, 100, 1.0)
    assert _leftovers(m) == [] and m.steps() == [100]
    m.save(200, _state(2.0))  # space freed: the next save works
    _assert_loads(m, 200, 2.0)


def _count_calls(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "resave-committed-step"])
@pytest.mark.parametrize("module, name", [(os, "fsync"), (os, "rename"), (os, "replace"), (os, "open"),
                                          (ckpt_mod, "_write_json"), (ckpt_mod, "_write_state")])
def test_crash_at_every_point_of_save_keeps_previous(tmp_path, monkeypatch, module, name, resave):
    """Fail the n-th call of each file operation a save makes, for every n; the old checkpoint survives."""
    target = 1 if resave else 2
    probe = CheckpointManager(tmp_path / "probe")
    probe.save(1, _state(1.0))
    calls = _count_calls(monkeypatch, module, name)
    probe.save(target, _state(2.0))
    monkeypatch.undo()
    assert calls, f"save never calls {name}"

    raised = 0
    for n in range(1, len(calls) + 1):
        for exc in (OSError(errno.EIO, "I/O error"), KeyboardInterrupt()):
            m = CheckpointManager(tmp_path / f"{name}-{n}-{type(exc).__name__}")
            m.save(1, _state(1.0))
            real, count = getattr(module, name), [0]

            def failing(*args, real=real, count=count, exc=exc, n=n, **kwargs):
                count[0] += 1
                if count[0] == n:
                    raise exc
                return real(*args, **kwargs)

            monkeypatch.setattr(module, name, failing)
            try:
                m.save(target, _state(2.0))
            except (CheckpointError, KeyboardInterrupt) as err:  # anything else fails the test
                assert isinstance(err, CheckpointError if isinstance(exc, OSError) else KeyboardInterrupt)
                raised += 1
            monkeypatch.undo()
            step, state = m.load_latest()
            value = state["model"]["w"][0, 0].item()
            # The old checkpoint, or the new one when the failure came after its commit.
            assert (step, value) in ((1, 1.0), (target, 2.0))
            assert torch.equal(state["model"]["w"], torch.full((4, 4), value))
            # No partial directory ever stays; only a failure in removing the superseded copy
            # after a commit may leave that copy, which the next save sweeps.
            allowed = (".old-",) if value == 2.0 else ()
            assert all(p.startswith(allowed) for p in _leftovers(m)), f"{name} call {n} left {_leftovers(m)}"
            m.save(3, _state(3.0))
            _assert_loads(m, 3, 3.0)
            assert _leftovers(m) == []
    assert raised >= len(calls)  # most failure points do raise


def test_commit_is_the_latest_pointer(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path)
    m.save(5, _state(5.0))

    def no_replace(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)  # the pointer update fails after the rename
    with pytest.raises(CheckpointError):
        m.save(6, _state(6.0))
    monkeypatch.undo()
    _assert_loads(m, 5, 5.0)


def test_resave_same_step_and_sweep_of_hard_kill_leftovers(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(10, _state(1.0))
    m.save(10, _state(1.5))
    _assert_loads(m, 10, 1.5)
    # A hard kill mid-save leaves a temp dir; a crash after a rename but before the pointer moved
    # leaves an uncommitted newer step from a timeline the resumed run abandons.
    (m.dir / ".tmp-step_00000020-x").mkdir()
    (m.dir / ".tmp-step_00000020-x" / "state.pt").write_bytes(b"half")
    CheckpointManager(tmp_path / "other").save(30, _state(9.0))
    os.rename(tmp_path / "other" / "checkpoints" / "step_00000030", m.dir / "step_00000030")
    _assert_loads(m, 10, 1.5)  # the pointer, not the newest directory, decides
    m.save(20, _state(2.0))
    assert m.steps() == [10, 20] and _leftovers(m) == []
    _assert_loads(m, 20, 2.0)


def test_interrupted_resave_recovers_aside_copy(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(10, _state(1.0))
    aside = m.dir / ".old-step_00000010-123-456"
    os.rename(m.dir / "step_00000010", aside)  # killed between the two renames of a re-save
    _assert_loads(m, 10, 1.0)
    m.save(11, _state(1.1))
    assert m.steps() == [10, 11] and _leftovers(m) == []


def test_dangling_pointer_falls_back_to_newest_complete(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, _state(1.0))
    m.save(2, _state(2.0))
    (m.dir / "latest").write_text("step_00000099\n")
    _assert_loads(m, 2, 2.0)


def test_damaged_or_unsafe_state_file(tmp_path):
    m = CheckpointManager(tmp_path)
    path = m.save(1, _state(1.0))
    (path / "state.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be read.*delete"):
        m.load_latest()
    m.save(2, {"obj": _Opaque()})
    with pytest.raises(CheckpointError, match="save only state_dict"):
        m.load_latest()


@dataclass
class _Opaque:
    x: int = 1


@dataclass
class _Cfg:
    lr: float = 1e-3
    layers: int = 2


def test_config_fingerprint_is_stable():
    a = config_fingerprint({"lr": 1e-3, "model": {"layers": 2, "dim": 64}})
    b = config_fingerprint({"model": {"dim": 64, "layers": 2}, "lr": 1e-3})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert a != config_fingerprint({"lr": 2e-3, "model": {"layers": 2, "dim": 64}})
    assert config_fingerprint(_Cfg()) == config_fingerprint({"lr": 1e-3, "layers": 2})


def test_fingerprint_mismatch_is_refused(tmp_path):
    CheckpointManager(tmp_path).verify_fingerprint("anything")  # nothing saved yet: nothing to check
    fp_a, fp_b = config_fingerprint({"lr": 1}), config_fingerprint({"lr": 2})
    m = CheckpointManager(tmp_path, fingerprint=fp_a)
    m.save(7, _state(1.0))
    m.verify_fingerprint(fp_a)
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(tmp_path, fingerprint=fp_b).verify_fingerprint(fp_b)
    msg = str(err.value)
    assert fp_a in msg and fp_b in msg and "--out" in msg and "same config" in msg and "step 7" in msg


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    state = rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first
    # Through a checkpoint file, loaded with weights_only=True.
    m = CheckpointManager(tmp_path)
    m.save(0, {"rng": state})
    _draws()
    set_rng_state(m.load_latest()[1]["rng"])
    assert _draws() == first


def _train(model, opt, steps, start):
    for step in range(start, start + steps):
        x = torch.randn(8, 6)
        y = x.sum(-1, keepdim=True) + 0.1 * float(np.random.randn()) + random.random()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _make():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_resumed_cpu_run_is_bit_identical(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, opt = _make()
    _train(model, opt, 6, 0)
    straight = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, opt = _make()
    _train(model, opt, 3, 0)
    m = CheckpointManager(tmp_path)
    m.save(3, {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()})
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # a new process starts elsewhere

    model, opt = _make()
    step, state = m.load_latest()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    _train(model, opt, 3, step)
    assert all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))


def test_sharded_state_round_trip_and_a_failed_shard_write_keeps_the_previous(tmp_path, monkeypatch):
    """Shards (torch.distributed.checkpoint) beside state.pt; a save that fails while writing them leaves the
    previous checkpoint committed and no partial directory."""
    m = CheckpointManager(tmp_path)
    path = m.save(1, {"data": {"pos": 1}}, shards={"model": {"w": torch.full((4, 4), 1.0)}})
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "shards", "state.pt"]
    assert json.loads((path / "meta.json").read_text())["format"] == 2
    target = {"model": {"w": torch.zeros(4, 4)}}
    m.load_shards(target)
    assert torch.equal(target["model"]["w"], torch.full((4, 4), 1.0)) and m.load_latest()[1] == {"data": {"pos": 1}}
    real = ckpt_mod.dcp.save

    def fill_disk(state, checkpoint_id, **kwargs):
        real(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards reach the disk, then the space runs out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.dcp, "save", fill_disk)
    with pytest.raises(CheckpointError, match=r"step 2.*disk is full.*newest whole checkpoint is step_00000001"):
        m.save(2, {"data": {"pos": 2}}, shards={"model": {"w": torch.full((4, 4), 2.0)}})
    monkeypatch.undo()
    assert m.steps() == [1] and _leftovers(m) == []
    m.load_shards(target)
    assert torch.equal(target["model"]["w"], torch.full((4, 4), 1.0))
    (path / "shards" / ".metadata").unlink()  # shards without their index are not a checkpoint
    assert m.steps() == []

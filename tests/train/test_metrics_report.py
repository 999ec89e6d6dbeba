from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from seekforge.cli import main
from seekforge.errors import SeekforgeError
from seekforge.train.report import write_report
from seekforge.train.metrics import (
    MetricsLogger,
    ProgressBar,
    Throughput,
    expert_load_stats,
    load_cv,
    max_min_ratio,
    read_metrics,
)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logger_writes_flushed_jsonl_with_lists(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 1e-4}, expert_load=torch.tensor([[1, 2], [3, 4]]))
    # Readable before close: each line is flushed as it is written.
    records = _lines(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 1 and records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-4
    assert records[0]["expert_load"] == [[1, 2], [3, 4]] and isinstance(records[0]["time"], float)
    logger.log(2, kind="eval", eval_loss=np.float32(1.5))
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resume_truncates_later_steps_and_partial_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(step, loss=10.0 - step)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 11, "loss": 0.')  # killed mid-line
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=6) as logger:
        for step in range(7, 9):
            logger.log(step, loss=100.0 + step)
    records = _lines(path)  # every line parses: no partial line survives
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in records[-3:]] == [4.0, 107.0, 108.0]


def test_append_after_kill_repairs_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, loss=2.0)
    first, second = _lines(path)  # every line parses: the cut line is gone
    assert first == {"step": 1, "loss": 3.0} and (second["step"], second["loss"]) == (2, 2.0)


def test_tensorboard_receives_scalars_lists_and_purges_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        assert logger.tensorboard
        for step in range(1, 6):
            logger.log(step, loss=float(step), bias=[0.1, -0.1], expert_load=[list(range(32))] * 2, note="x")
        logger.log(5, kind="eval", loss=0.5)
    with MetricsLogger(tmp_path, resume_step=3) as logger:
        logger.log(4, loss=40.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    assert {"loss", "bias/0", "bias/1", "eval/loss"} <= set(tags["scalars"])
    assert {"expert_load/0", "expert_load/1"} <= set(tags["histograms"])
    # purge_step drops the dead run's steps 4-5 from the event stream.
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_logger_without_tensorboard_module(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with MetricsLogger(tmp_path) as logger:
        assert not logger.tensorboard
        logger.log(1, loss=1.0)
    assert not (tmp_path / "tensorboard").exists()
    assert _lines(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_moe_load_statistics():
    load = torch.tensor([[10.0, 10.0, 10.0, 10.0], [1.0, 2.0, 3.0, 6.0], [0.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert max_min_ratio(load).tolist() == [1.0, 6.0, math.inf, 1.0]
    cv = load_cv(load)
    expected = np.array([1.0, 2.0, 3.0, 6.0]).std() / 3.0  # population std over mean
    assert cv.tolist() == pytest.approx([0.0, expected, np.array([0, 4, 4, 4]).std() / 3.0, 0.0])
    stats = expert_load_stats([5, 5])  # one layer given as a flat list
    assert stats == {"max_min_ratio": [1.0], "cv": [0.0]}
    with pytest.raises(ValueError, match="expert load must be"):
        load_cv(torch.zeros(2, 2, 2))


def test_throughput_and_progress_bar(capsys):
    meter = Throughput(smoothing=0.5)
    assert meter.update(1000) > 0 and meter.rate is not None
    with ProgressBar(total_steps=10, start_step=2, disable=False) as bar:
        bar.update(5, loss=1.23456, lr=3e-4, tokens_per_s=12345.0)
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.2346" in err and "lr=3.00e-04" in err and "tok/s=12.35k" in err


def _synthetic_run(run_dir, steps=60, layers=2, experts=8):
    rng = random.Random(0)
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            skew = max(0.0, 1.0 - step / steps)
            load = [[100 + int(200 * skew * (e == 0)) + rng.randint(0, 5) for e in range(experts)]
                    for _ in range(layers)]
            bias = [[-0.001 * step * (e == 0) for e in range(experts)] for _ in range(layers)]
            logger.log(step, loss=5.0 - 3.0 * step / steps, mtp_loss=5.5 - 3.0 * step / steps,
                       lr=1e-3 * min(1.0, step / 10), tokens_per_s=1000.0 + step,
                       expert_load=load, expert_bias=bias, reward_accuracy=step / steps, accuracy_format=0.5)
            if step % 20 == 0:
                logger.log(step, kind="eval", loss=4.0 - step / 100, bytes_per_token=4.0, accuracy_format=0.7)
        logger.log(steps, eval_loss=3.0, eval_bpb=1.1)  # the other eval convention


def test_report_writes_pngs_and_markdown(tmp_path):
    _synthetic_run(tmp_path)
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["expert_bias.png", "expert_load_layer00.png", "expert_load_layer01.png", "loss.png",
                    "lr.png", "rewards.png"]
    for name in pngs:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    md = report.read_text()
    assert "| train loss | 4.95 | 2 | 2 (60) |" in md
    assert "| eval loss | 3.8 | 3 | 3 (60) |" in md
    assert "Eval bits per byte: last 1.1 (step 60), best 1.1 (step 60)" in md
    assert "median 1030 tokens/s" in md
    final_load = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "expert_load" in r][-1]["expert_load"]
    cv0 = np.std(final_load[0]) / np.mean(final_load[0])
    assert f"| 0 | {cv0:.4g} |" in md
    assert "| reward_accuracy | 1 | 1 (60) |" in md and "| eval accuracy_format | 0.7 |" in md
    for name in pngs:
        assert f"(plots/{name})" in md


def test_report_bits_per_byte_from_bytes_per_token(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "kind": "eval", "loss": 2.0,
                                                        "bytes_per_token": 4.0}) + "\n")
    md = write_report(tmp_path).read_text()
    assert f"Eval bits per byte: last {2.0 / math.log(2) / 4.0:.4g} (step 5)" in md


def test_report_skips_missing_fields_and_cli(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]
    md = (tmp_path / "report.md").read_text()
    assert "| train loss | 2 | 1.5 | 1.5 (2) |" in md and "Expert load" not in md
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "metrics.jsonl").write_text(json.dumps({"step": 1, "expert_load": [[3, 1], []], "expert_bias": [[]],
                                                   "loss": "nan?", "reward": None}) + "\n")
    md = write_report(odd).read_text()
    assert "| 0 | 0.5 | 3 |" in md and "| 1 |" not in md
    assert sorted(p.name for p in (odd / "plots").iterdir()) == ["expert_load_layer00.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert "No plottable fields" in write_report(empty).read_text()
    with pytest.raises(SeekforgeError, match="no metrics.jsonl here"):
        write_report(tmp_path / "nowhere")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err

"""`seekforge eval CKPT --lm-eval TASK`: an lm-evaluation-harness task from a local YAML file run on a
checkpoint. lm-eval's rolling log-likelihood (its perplexity task type, on transformers) gives the bits per byte
that `seekforge eval --text` computes with seekforge's own model; a missing lm_eval or task is a clear error."""

from __future__ import annotations

import json
import sys

import pytest

from seekforge.cli import main

# no final newline: lm-eval renders doc_to_target through Jinja, which drops a trailing one
DOCS = ["Alice has 12 apples and buys 30 more: 12 + 30 = 42. Café au lait, naïve résumé.",
        "Bob had 7 pears, ate 2, and has 5 left."]


def task_dir(tmp_path):
    """A folder holding a loglikelihood_rolling task (lm-eval's perplexity type, as its wikitext) over DOCS."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "ppl.yaml").write_text(
        f"task: seekforge_local_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return folder


@pytest.mark.slow  # lm-eval's task setup and transformers: over 20 s on a busy 2-core CPU
def test_lm_eval_task_on_a_checkpoint_agrees_with_seekforge_perplexity(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    path = tiny_checkpoint()
    folder = task_dir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(path), "--lm-eval", "seekforge_local_ppl", "--include-path", str(folder),
                 "--lm-eval-limit", "1", "--device", "cpu", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out.json").read_text()) == out
    result = out["results"]["seekforge_local_ppl"]
    assert out["n-samples"]["seekforge_local_ppl"]["effective"] == 1  # --lm-eval-limit 1: the first document

    # the first document fits one window of the model's context: lm-eval scores it after BOS, as seekforge does
    (tmp_path / "doc.txt").write_text(DOCS[0], encoding="utf-8")
    assert main(["eval", str(path), "--text", str(tmp_path / "doc.txt"), "--device", "cpu"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["windows"] == 1
    assert result["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(2 ** ours["bits_per_byte"], rel=1e-5)


def test_lm_eval_errors_are_named(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    path = tiny_checkpoint()
    folder = task_dir(tmp_path)
    for args, needle in (((str(path), "--lm-eval", "no_such_task_here", "--include-path", str(folder)),
                          "lm-eval knows no task no_such_task_here"),
                         ((str(path), "--lm-eval", "seekforge_local_ppl", "--include-path", str(tmp_path / "nope")),
                          "--include-path"),
                         ((str(tmp_path), "--lm-eval", "seekforge_local_ppl"), "no config.json")):
        capsys.readouterr()
        assert main(["eval", *args]) == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", str(path), "--lm-eval", "seekforge_local_ppl"]) == 2
    assert "pip install 'seekforge[eval]'" in capsys.readouterr().err

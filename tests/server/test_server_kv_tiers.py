"""The server with KV tiers: `seekforge serve --kv-cpu-gb/--kv-disk/--kv-disk-gb` fill the engine's settings, the
tiers' use and hits are Prometheus gauges, and a server started again on the same disk directory serves a prompt's
prefix from the disk tier (what the first one wrote before it shut down), with the same completion."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_harness import IN_PROCESS_NAME, build_checkpoint, in_process  # noqa: E402

from seekforge.cli import main  # noqa: E402
from seekforge.engine import EngineConfig  # noqa: E402

BODY = {"model": IN_PROCESS_NAME, "prompt": [5 + i % 200 for i in range(150)], "max_tokens": 8, "temperature": 0}


def metrics(http) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(http.get("/metrics").text) for s in fam.samples}


def test_a_restarted_server_serves_prefixes_from_the_disk_tier(tmp_path):
    path = tmp_path / "ckpt"
    build_checkpoint(path)
    engine = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=2, block_size=16, num_blocks=40,
                          kv_cpu_gb=0.01, kv_disk=str(tmp_path / "kv"), kv_disk_gb=0.5)
    runs = []
    for _ in range(2):  # the app's lifespan ends with the engine's, which closes the tiers (writes land)
        with in_process(path, IN_PROCESS_NAME, engine) as http:
            r = http.post("/v1/completions", json=BODY)
            assert r.status_code == 200, r.text
            deadline = time.time() + 10  # an idle engine publishes its figures within half a second
            while metrics(http)[("seekforge_prefill_tokens_computed", ())] <= 1 and time.time() < deadline:
                time.sleep(0.1)  # 1: the start-up probe's one token
            runs.append((r.json()["choices"][0]["text"], metrics(http)))
    (first, before), (again, after) = runs
    assert again == first
    full = (len(BODY["prompt"]) - 1) // 16 * 16  # the prompt's full blocks
    prefill = [m[("seekforge_prefill_tokens_computed", ())] for m in (before, after)]
    assert prefill[0] >= len(BODY["prompt"]) and prefill[0] - prefill[1] == full  # the same probes, then the prompt
    assert after[("seekforge_kv_tier_hit_rate", (("tier", "disk"),))] > 0.5
    assert before[("seekforge_kv_tier_used_bytes", (("tier", "cpu"),))] > 0
    assert 0 < after[("seekforge_kv_tier_used_bytes", (("tier", "disk"),))] <= after[
        ("seekforge_kv_tier_capacity_bytes", (("tier", "disk"),))] == 0.5 * 2**30
    assert after[("seekforge_kv_disk_corrupt_blocks", ())] == 0


def test_serve_flags_fill_the_engine_settings(tmp_path, monkeypatch):
    import seekforge.server

    (tmp_path / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(seekforge.server, "serve", lambda config: seen.append(config.engine) or 0)
    assert main(["serve", str(tmp_path), "--kv-cpu-gb", "4", "--kv-disk", str(tmp_path / "kv"),
                 "--kv-disk-gb", "100"]) == 0
    assert (seen[0].kv_cpu_gb, seen[0].kv_disk, seen[0].kv_disk_gb) == (4.0, str(tmp_path / "kv"), 100.0)
    assert main(["serve", str(tmp_path)]) == 0 and seen[1].kv_cpu_gb == 0 and seen[1].kv_disk is None
    assert main(["serve", str(tmp_path), "--kv-disk", str(tmp_path / "kv")]) == 2
    assert main(["serve", str(tmp_path), "--kv-cpu-gb", "-1"]) == 2

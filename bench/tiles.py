"""Tile sweeps of the Triton kernel benchmarks (bench/moe.py, bench/gemv.py)."""

from __future__ import annotations

from dataclasses import asdict


def fastest(configs, time_us, keep: int = 3) -> list[dict]:
    """Each tile config timed by time_us(config) -> us; the `keep` fastest as dicts with their "us". A tile this
    GPU cannot run (shared memory, registers) is reported and skipped."""
    timed = []
    for cfg in configs:
        try:
            timed.append((time_us(cfg), cfg))
        except Exception as err:  # noqa: BLE001 - any failure of a tile only removes it from the sweep
            print(f"  skip {cfg}: {type(err).__name__}", flush=True)
    timed.sort(key=lambda t: t[0])
    return [{"us": us, **asdict(cfg)} for us, cfg in timed[:keep]]

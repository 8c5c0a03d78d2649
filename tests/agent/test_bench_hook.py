"""`interlatent bench hook` (with --breakdown) and `--suite` run end to end on a few steps and report
every figure, for the capture path before issue 19 and now (their values are the benchmark's to
report, not a test's to assert); the memory check's agents stream what they should."""

from __future__ import annotations

import pytest

from monitor.tools.bench import MEMORY_VARIANTS, PATHS, PEERS, bench_hook, bench_suite


def test_bench_hook_reports_both_paths_and_the_breakdown() -> None:
    res = bench_hook(rounds=1, steps=150, warmup=50, breakdown=True)
    assert res["plain_steps_per_s"] > 0
    for path in PATHS:
        for peer in PEERS:
            v = res[path][peer]
            assert v["steps_per_s"] > 0 and set(v["ratio"]) == {"median", "min", "max"} == set(v["added_us_per_step"])
        parts = res["breakdown"][path]
        assert set(parts) == {"hook_dispatch", "capture", "metric_row", "wrapper_layer", "batching_sending", "total_us"}


@pytest.mark.timeout(400)
def test_bench_suite_runs_each_part() -> None:
    res = bench_suite(rounds=1, steps=400, sac_steps=100, tokens=2)
    for part in ("sac", "gpt2"):
        for path in PATHS:
            assert set(res[part][path]) == {"ratio", "added_us"}
    mem = res["memory"]["variants"]
    assert list(mem) == list(MEMORY_VARIANTS)
    assert mem["unhooked"]["sent"] == mem["no_monitor"]["sent"] == 0
    assert mem["monitor"]["sent"] > 0 and mem["stalled"]["sent"] > 0  # the stalled monitor's queue takes frames, then drops
    assert all(v["peak_mb"] >= v["start_mb"] > 0 for v in mem.values())

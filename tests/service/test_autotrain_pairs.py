"""Auto-train with several pairs: every pair gets its transcoder, one child at a time, and a pair
that fails does not stop the ones after it (the setup of test_autotrain.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import AGENT_DIR, free_endpoint, spawn, spawn_monitor, wait_until

from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS


def test_every_pair_trains_after_one_that_fails(tmp_path: Path, redis_url: str, store: Store) -> None:
    hidden = DEMO_TAPS[1]
    broken = f"{DEMO_TAPS[0]}>nowhere:out"  # the run streams the source but not the target: train exits 2
    ep = free_endpoint()
    mon = spawn_monitor(
        redis_url,
        ep,
        "--data-dir",
        str(tmp_path),
        "--auto-train",
        f"{broken},{DEMO_TAPS[0]}>{hidden},{hidden}>{hidden}",
        "--auto-train-steps",
        "300",
        "--auto-train-latents",
        "2",
        "--auto-train-epochs",
        "5",
    )
    agent = spawn(
        [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "20000", "--sleep-ms", "1", "--run", "auto"],
        stdout=subprocess.DEVNULL,
    )
    try:

        def pairs() -> set[tuple[str, str]] | None:
            got = {(t["source"], t["target"]) for t in store.transcoders() if t["run"] == "auto"}
            return got if len(got) == 2 else None

        got = wait_until(pairs, timeout_s=180, what="transcoders of both good pairs")
        assert got == {(DEMO_TAPS[0], hidden), (hidden, hidden)}
        assert {t["d_sae"] for t in store.transcoders()} == {2}
    finally:
        agent.kill()
        agent.wait()
        mon.terminate()
        out, _ = mon.communicate(timeout=20)
    log = out.decode(errors="replace")
    # each pair starts only once the one before was reaped (the last one may still be exiting here)
    assert f"auto-train of {DEMO_TAPS[0]} -> nowhere:out of run 'auto' finished with exit code 2" in log
    assert f"auto-train of {DEMO_TAPS[0]} -> {hidden} of run 'auto' finished with exit code 0" in log

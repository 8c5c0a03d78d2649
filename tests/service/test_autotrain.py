"""Auto-train: the monitor records a warm-up, trains in a child process, then encodes live."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import AGENT_DIR, free_endpoint, spawn, spawn_monitor, wait_until

from monitor.service.autotrain import parse_pairs
from monitor.service.encoding import LATENT_PREFIX
from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS


def test_pairs_parse_and_refuse_nonsense() -> None:
    assert parse_pairs("a:in>b:out, c:out>c:out") == [("a:in", "b:out"), ("c:out", "c:out")]
    with pytest.raises(ValueError, match="SOURCE>TARGET"):
        parse_pairs("a:in")


def test_warm_up_then_latents_appear_in_status(tmp_path: Path, redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(
        redis_url,
        ep,
        "--data-dir",
        str(tmp_path),
        "--auto-train",
        f"{DEMO_TAPS[0]}>{DEMO_TAPS[1]}",
        "--auto-train-steps",
        "300",
        "--auto-train-latents",
        "2",
        "--auto-train-epochs",
        "5",
    )
    agent = spawn(
        [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "20000", "--sleep-ms", "1", "--run", "auto"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:

        def latents() -> dict | None:
            for r in store.status()["runs"]:
                taps = {t: v for t, v in r["taps"].items() if t.startswith(LATENT_PREFIX)}
                if r["run"] == "auto" and taps and all(v["rows"] > 0 for v in taps.values()):
                    return taps
            return None

        taps = wait_until(latents, timeout_s=120, what="latents of the auto-trained transcoder")
        ((name, info),) = taps.items()
        assert info["width"] == 2
        (tc,) = store.transcoders()
        assert (tc["run"], tc["source"], tc["target"], tc["d_sae"]) == ("auto", DEMO_TAPS[0], DEMO_TAPS[1], 2)
        assert name == LATENT_PREFIX + tc["name"] and tc["quality"]["fvu"] >= 0  # 5 epochs: plumbing, not quality
    finally:
        agent.kill()
        agent.wait()
        mon.terminate()
        mon.wait(timeout=20)

"""The layout's promises: commands that need no model never load torch, the wire imports on its
own, and the packages export what they say."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

# Each runs in a fresh interpreter, which then says which heavy modules it loaded.
_PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in ("torch", "transformers", "stable_baselines3", "streamlit") if m in sys.modules)))
"""


def _loaded(body: str, *extra: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    [
        "agent_side.wire",
        "monitor",
        "monitor.cli.main",
        "monitor.panel.data",
        "monitor.store",
        "monitor.stats.analytics",
        "monitor.alerts.engine",
        "monitor.service.steering",
        "explainer",
        "explainer.worker",
    ],
)
def test_importing_what_the_light_commands_use_loads_no_torch(module: str) -> None:
    assert "torch" not in _loaded(f"import {module}")


def test_the_light_commands_run_without_torch(redis_url: str, store, live_monitor) -> None:
    """--help, status, stats, alerts and explanations on a run a real monitor holds, and the
    rules explainer's burst run, all in one process that never imports torch."""
    import numpy as np
    import zmq
    from helpers import wait_until

    from agent_side.wire import encode_act, encode_met

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live_monitor.endpoint)
    pos = np.stack([np.arange(64), np.zeros(64, dtype=np.int64)], axis=1)
    rows = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    sock.send_multipart(encode_act("light", "p", 0, 0, "t:out", rows, pos))
    sock.send_multipart(encode_met("light", "p", 1, 0, ["m"], rows[:, :1].astype(np.float64), pos))
    wait_until(lambda: "light" in store.runs() and store.taps("light"), what="the run in Redis")
    sock.close()
    body = f"""
from monitor.cli.main import main
for argv in (["status", "--help"], ["--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, argv
for argv in (["status"], ["stats", "--run", "light"], ["alerts"], ["explanations", "--run", "light"], ["explainer", "--burst"]):
    assert main([*argv, "--redis", {redis_url!r}]) == 0, argv
"""
    assert _loaded(body) == []


def test_exported_names() -> None:
    import agent_side
    import monitor

    assert sorted(agent_side.__all__) == ["Attachment", "DEFAULT_ENDPOINT", "TapError", "WireError", "attach", "parse_tap"]
    for name in agent_side.__all__:
        assert getattr(agent_side, name) is not None
    assert callable(agent_side.attach) and agent_side.attach.__name__ == "attach"  # the function, not a module
    for name in monitor.__all__:
        assert getattr(monitor, name) is not None
    with pytest.raises(AttributeError):
        monitor.nothing  # noqa: B018

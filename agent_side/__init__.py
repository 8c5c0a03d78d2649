"""Everything that runs inside the agent's process: attach, hooks, env wrappers, the wire.

Light by design: numpy, torch, pyzmq and msgpack only (gymnasium and stable-baselines3 are
imported when you wrap an env or ask for the SB3 callback). torch loads with the first use of
``attach``, ``Attachment``, ``parse_tap`` or ``TapError``, so the wire (``agent_side.wire``)
imports without it: the monitor's commands that need no model never load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent_side.wire import DEFAULT_ENDPOINT, WireError

__all__ = ["attach", "Attachment", "DEFAULT_ENDPOINT", "TapError", "WireError", "parse_tap"]

_HOME = {
    "attach": "agent_side.attachment",
    "Attachment": "agent_side.attachment",
    "TapError": "agent_side.taps",
    "parse_tap": "agent_side.taps",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agent_side' has no attribute {name!r}")

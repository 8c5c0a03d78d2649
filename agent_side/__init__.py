"""Everything that runs inside the agent's process: attach, hooks, env wrappers, the wire.

Light by design: numpy, torch, pyzmq and msgpack only (gymnasium and stable-baselines3 are
imported when you wrap an env or ask for the SB3 callback).
"""

from agent_side.attach import DEFAULT_ENDPOINT, Attachment, attach
from agent_side.taps import TapError, parse_tap
from agent_side.wire import WireError

__all__ = ["attach", "Attachment", "DEFAULT_ENDPOINT", "TapError", "WireError", "parse_tap"]

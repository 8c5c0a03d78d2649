"""Which monitor a run streams to, when there are several: rendezvous hashing, no broker.

An agent is given the whole tier (``attach(..., endpoint=[...])``, or ``$INTERLATENT_ENDPOINTS``
as a comma-separated list) and orders it for its run with :func:`rendezvous`: every agent of a
run, and every monitor, computes the same order from the run's name alone. The sender streams to
the first endpoint of that order that it can reach and fails over down the list
(:class:`agent_side.sender.Sender`). Removing a monitor from the list moves only the runs that
monitor had; adding one takes from each of the others only the runs it now wins.

Pure functions of their arguments (the environment is read only by :func:`endpoints_from_env`),
importable without torch, so the monitor side can compute a run's order too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence

__all__ = ["rendezvous", "parse_endpoints", "endpoints_from_env", "DEFAULT_FAILOVER_S"]

DEFAULT_FAILOVER_S = 3.0  # how long a run's preferred monitor may be away before the run moves

_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.%]+\]|[^\s\[\]/:,;*]+):([0-9]{1,5})")  # a host to connect to: no *
_IPC = re.compile(r"ipc://[^\s,]+")


def _weight(run: str, endpoint: str) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and every agent and monitor must agree
    h = hashlib.blake2b(digest_size=8)
    h.update(run.encode())
    h.update(b"\0")  # ("ab", "c") and ("a", "bc") must not weigh the same
    h.update(endpoint.encode())
    return int.from_bytes(h.digest(), "big")


def rendezvous(run: str, endpoints: Sequence[str]) -> list[str]:
    """The endpoints in the order ``run`` prefers them (highest random weight first).

    Each endpoint weighs a 64-bit blake2b hash of (run, endpoint), the same in every process and
    on every machine; ties (never seen in practice) go by the endpoint's text. Example::

        >>> order = rendezvous("eval", ["tcp://m1:5557", "tcp://m2:5557", "tcp://m3:5557"])
        >>> sorted(order) == ["tcp://m1:5557", "tcp://m2:5557", "tcp://m3:5557"]
        True
        >>> rendezvous("eval", [e for e in order if e != order[0]]) == order[1:]
        True
    """
    return sorted(endpoints, key=lambda e: (_weight(run, e), e), reverse=True)


def _check(item: str, source: str) -> None:
    tcp = _TCP.fullmatch(item)
    if tcp is not None and 1 <= int(tcp.group(2)) <= 65535:
        return
    if tcp is None and _IPC.fullmatch(item):
        return
    raise ValueError(
        f"{source}: {item!r} is not an endpoint to connect to: expected tcp://HOST:PORT (port 1-65535) or ipc://PATH"
    )


def parse_endpoints(value: str | Sequence[str], *, source: str = "endpoint") -> list[str]:
    """A list of endpoints from a comma-separated string or a sequence, each stripped of
    whitespace and checked (``tcp://HOST:PORT`` or ``ipc://PATH``), in the order given.

    An empty item, a malformed one or a repeat raises one :class:`ValueError` that names it and
    ``source`` (the argument or variable it came from)::

        >>> parse_endpoints(" tcp://m1:5557, tcp://m2:5557 ")
        ['tcp://m1:5557', 'tcp://m2:5557']
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{source}: no endpoint given")
    out: list[str] = []
    for i, raw in enumerate(items, 1):
        if not isinstance(raw, str):
            raise ValueError(f"{source}: item {i} is {type(raw).__name__}, not an endpoint string")
        item = raw.strip()
        if not item:
            raise ValueError(f"{source}: item {i} of {value!r} is empty (a stray comma?)")
        _check(item, source)
        if item in out:
            raise ValueError(f"{source}: {item!r} is listed twice")
        out.append(item)
    return out


def endpoints_from_env(default: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The endpoints an agent uses when none are given: ``$INTERLATENT_ENDPOINTS`` (comma
    separated) if set and not empty, else ``$INTERLATENT_ENDPOINT``, else ``default``."""
    many = environ.get("INTERLATENT_ENDPOINTS", "")
    if many.strip():
        return parse_endpoints(many, source="$INTERLATENT_ENDPOINTS")
    one = environ.get("INTERLATENT_ENDPOINT")
    if one:
        return parse_endpoints(one, source="$INTERLATENT_ENDPOINT")
    return parse_endpoints(default, source="the default endpoint")

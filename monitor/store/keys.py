"""Every Redis key and stream name Interlatent uses. No key strings anywhere else.

Runs and taps may contain ':'. Each kind of key has its own prefix, and where two names meet the
first is length-prefixed, so no two (run, tap) pairs share a key; nothing parses keys back
apart: the run registry ``RUNS`` lists the run names.
"""

from __future__ import annotations

__all__ = [
    "LATENT_PREFIX",
    "PREFIX",
    "RUNS",
    "REJECTED",
    "LOST",
    "HEALTH_MATCH",
    "ALERTS",
    "ALERTS_ACTIVE",
    "ALERTS_COUNT",
    "RECORD",
    "TRANSCODERS",
    "TRANSCODERS_VERSION",
    "EXPLAIN_JOBS",
    "EXPLAIN_GROUP",
    "EXPLAIN_PENDING",
    "explanations",
    "STEER_VERSION",
    "STEER_EVENTS",
    "steer",
    "control",
    "run",
    "run_taps",
    "run_pubs",
    "run_metrics",
    "tap_stats",
    "recent",
    "analytics",
    "suggestions",
    "episodes",
    "tokens",
    "health",
    "run_keys",
]

LATENT_PREFIX = "latents:"  # not a key: the tap name a transcoder's latents stream under, latents:<name>
PREFIX = "il:"
RUNS = PREFIX + "runs"  # zset: run -> last seen (unix s)
REJECTED = PREFIX + "monitor:rejected"  # hash: reason -> count, summed over monitors
LOST = PREFIX + "monitor:lost"  # hash: kind (episodes, tokens, control) -> records a full outbox let go, summed over monitors
HEALTH_MATCH = PREFIX + "health:*"
ALERTS = PREFIX + "alerts"  # stream of alert events (firing / resolved), capped
ALERTS_ACTIVE = PREFIX + "alerts:active"  # hash: alert id -> JSON of the firing alert
ALERTS_COUNT = PREFIX + "alerts:count"  # hash: "rule|state" -> count
RECORD = PREFIX + "record"  # hash: run -> JSON recording request and its progress
TRANSCODERS = PREFIX + "transcoders"  # hash: name -> JSON of a registered transcoder artifact
TRANSCODERS_VERSION = PREFIX + "transcoders:version"  # counter bumped on every registration
EXPLAIN_JOBS = PREFIX + "explain:jobs"  # stream of explain jobs, read by the consumer group below
EXPLAIN_GROUP = "explainers"  # consumer group name on EXPLAIN_JOBS
EXPLAIN_PENDING = PREFIX + "explain:pending"  # set of "run|tap|latent" with a job queued: duplicates collapse
STEER_VERSION = PREFIX + "steer:version"  # counter bumped on every change of any run's steering: monitors poll it
STEER_EVENTS = PREFIX + "steer:events"  # stream of agents' steering events (applied / reverted / refused), capped


def run(name: str) -> str:
    """Hash of a run's counters: steps, gaps, frames, first/last seen, episode figures."""
    return f"{PREFIX}run:{name}"


def run_taps(name: str) -> str:
    """Hash: tap -> JSON {width, dtype, rows, frames, lead}."""
    return f"{PREFIX}taps:{name}"


def run_pubs(name: str) -> str:
    """Hash: publisher id -> JSON {seq, drops}: where each agent process's sequence stands."""
    return f"{PREFIX}pubs:{name}"


def run_metrics(name: str) -> str:
    """String: msgpack of the run's metric columns, their moments and recent rows."""
    return f"{PREFIX}metrics:{name}"


def tap_stats(name: str, tap: str) -> str:
    """String: msgpack of a tap's running channel moments."""
    return f"{PREFIX}stats:{len(name)}:{name}:{tap}"


def recent(name: str, tap: str) -> str:
    """String: msgpack of a tap's most recent rows with their (step, index)."""
    return f"{PREFIX}recent:{len(name)}:{name}:{tap}"


def analytics(name: str, tap: str) -> str:
    """String: msgpack of a tap's live analytics (correlations, rolling stats, top examples)."""
    return f"{PREFIX}analytics:{len(name)}:{name}:{tap}"


def suggestions(name: str) -> str:
    """String: JSON list of early-warning rules the monitor suggests for a run."""
    return f"{PREFIX}suggest:{name}"


def explanations(name: str) -> str:
    """Hash: "tap/latent" -> JSON explanation of that latent (text, score, backend, examples)."""
    return f"{PREFIX}explanations:{name}"


def tokens(name: str) -> str:
    """Hash: step -> JSON [[token, ...], ...] of a language-model forward (the newest prompts only)."""
    return f"{PREFIX}tokens:{name}"


def episodes(name: str) -> str:
    """Stream of ended episodes (capped): step, index, return, length, terminated, truncated."""
    return f"{PREFIX}episodes:{name}"


def health(kind: str, ident: str) -> str:
    """String with a TTL: a live service's heartbeat (JSON)."""
    return f"{PREFIX}health:{kind}:{ident}"


def steer(name: str) -> str:
    """String: JSON {version, interventions: [Intervention.to_msg(), ...]}, the set a run's agent should hold."""
    return f"{PREFIX}steer:run:{name}"


def control(name: str) -> str:
    """Hash of a run's control channel: control (1: an agent holding the monitor's key is subscribed
    to the run's topic, its opt-in; 0: it left, or the agent said it does not accept control), pub,
    hello (time), version (the set it holds), active (JSON ids), time: all from the authenticated
    connection, but for control 0."""
    return f"{PREFIX}control:{name}"


def run_keys(name: str, taps: list[str]) -> list[str]:
    """Every key that holds one run's own state (with these taps): what deleting the run removes.
    Shared streams (alerts, steering events) are capped and keep their entries."""
    per_tap = [k(name, t) for t in taps for k in (tap_stats, recent, analytics)]
    own = [run, run_taps, run_pubs, run_metrics, suggestions, explanations, tokens, episodes, steer, control]
    return [k(name) for k in own] + per_tap

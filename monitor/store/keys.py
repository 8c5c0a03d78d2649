"""Every Redis key and stream name Interlatent uses. No key strings anywhere else.

Redis Cluster: every key that holds one run's own state carries the run as its hash tag
(``il:run:{NAME}``, ``il:stats:{NAME}:TAP``), so a run's keys share one slot and its writes stay
one MULTI/EXEC. Run names may contain anything: inside the braces ``%``, ``{`` and ``}`` are
percent-escaped, so the tag is never cut short and no two runs share a key; the empty name is
``{%}``, which no escaped name can be. Global keys that one transaction touches together share a
tag too (``{transcoders}``); every other global key is its own slot. Nothing parses keys back
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
    "explain_pending",
    "lease",
    "LEASES",
    "LEASES_WANTED",
    "hash_tag",
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
TRANSCODERS = PREFIX + "{transcoders}"  # hash: name -> JSON of a registered transcoder artifact
TRANSCODERS_VERSION = PREFIX + "{transcoders}:version"  # counter bumped with every registration, in its transaction
EXPLAIN_JOBS = PREFIX + "explain:jobs"  # stream of explain jobs, read by the consumer group below
EXPLAIN_GROUP = "explainers"  # consumer group name on EXPLAIN_JOBS
STEER_VERSION = PREFIX + "steer:version"  # counter bumped on every change of any run's steering: monitors poll it
STEER_EVENTS = PREFIX + "steer:events"  # stream of agents' steering events (applied / reverted / refused), capped
LEASES = PREFIX + "leases"  # stream of lease events (acquired / released / lost / handed_over) by run and monitor, capped
LEASES_WANTED = PREFIX + "leases:wanted"  # zset: run -> when a monitor last asked for its lease (it was refused)


def hash_tag(name: str) -> str:
    """``{NAME}`` with ``%``, ``{`` and ``}`` percent-escaped: the run's Redis Cluster hash tag."""
    if not name:
        return "{%}"
    return "{" + name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"


def run(name: str) -> str:
    """Hash of a run's counters: steps, gaps, frames, first/last seen, episode figures."""
    return f"{PREFIX}run:{hash_tag(name)}"


def run_taps(name: str) -> str:
    """Hash: tap -> JSON {width, dtype, rows, frames, lead}."""
    return f"{PREFIX}taps:{hash_tag(name)}"


def run_pubs(name: str) -> str:
    """Hash: publisher id -> JSON {seq, drops}: where each agent process's sequence stands."""
    return f"{PREFIX}pubs:{hash_tag(name)}"


def run_metrics(name: str) -> str:
    """String: msgpack of the run's metric columns, their moments and recent rows."""
    return f"{PREFIX}metrics:{hash_tag(name)}"


def tap_stats(name: str, tap: str) -> str:
    """String: msgpack of a tap's running channel moments."""
    return f"{PREFIX}stats:{hash_tag(name)}:{tap}"


def recent(name: str, tap: str) -> str:
    """String: msgpack of a tap's most recent rows with their (step, index)."""
    return f"{PREFIX}recent:{hash_tag(name)}:{tap}"


def analytics(name: str, tap: str) -> str:
    """String: msgpack of a tap's live analytics (correlations, rolling stats, top examples)."""
    return f"{PREFIX}analytics:{hash_tag(name)}:{tap}"


def suggestions(name: str) -> str:
    """String: JSON list of early-warning rules the monitor suggests for a run."""
    return f"{PREFIX}suggest:{hash_tag(name)}"


def explanations(name: str) -> str:
    """Hash: "tap/latent" -> JSON explanation of that latent (text, score, backend, examples)."""
    return f"{PREFIX}explanations:{hash_tag(name)}"


def tokens(name: str) -> str:
    """Hash: step -> JSON [[token, ...], ...] of a language-model forward (the newest prompts only)."""
    return f"{PREFIX}tokens:{hash_tag(name)}"


def episodes(name: str) -> str:
    """Stream of ended episodes (capped): step, index, return, length, terminated, truncated."""
    return f"{PREFIX}episodes:{hash_tag(name)}"


def health(kind: str, ident: str) -> str:
    """String with a TTL: a live service's heartbeat (JSON)."""
    return f"{PREFIX}health:{kind}:{ident}"


def steer(name: str) -> str:
    """String: JSON {version, interventions: [Intervention.to_msg(), ...]}, the set a run's agent should hold."""
    return f"{PREFIX}steer:run:{hash_tag(name)}"


def control(name: str) -> str:
    """Hash of a run's control channel: control (1: an agent holding the monitor's key is subscribed
    to the run's topic, its opt-in; 0: it left, or the agent said it does not accept control), pub,
    hello (time), version (the set it holds), active (JSON ids), time: all from the authenticated
    connection, but for control 0."""
    return f"{PREFIX}control:{hash_tag(name)}"


def explain_pending(name: str) -> str:
    """Set of "tap|latent" of the run with an explain job queued: duplicates collapse."""
    return f"{PREFIX}explain:pending:{hash_tag(name)}"


def lease(name: str) -> str:
    """String with a TTL: the id of the one monitor that may write this run's state now."""
    return f"{PREFIX}lease:{hash_tag(name)}"


def run_keys(name: str, taps: list[str]) -> list[str]:
    """Every key that holds one run's own state (with these taps): what deleting the run removes.
    Shared streams (alerts, steering events) are capped and keep their entries."""
    per_tap = [k(name, t) for t in taps for k in (tap_stats, recent, analytics)]
    own = [run, run_taps, run_pubs, run_metrics, suggestions, explanations, explain_pending, tokens, episodes, steer, control]
    return [k(name) for k in own] + per_tap

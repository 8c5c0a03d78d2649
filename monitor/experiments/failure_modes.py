"""How an episode ended, per environment: a registry of episode-end classifiers.

A classifier is ``fn(last_obs, terminated, truncated, info, env) -> str``: it gets the last
observation and flags ``env.step`` returned, the last ``info`` and the env itself (to read its
thresholds), and names the way the episode ended. Sweeps count these labels per condition, as the
seed post's failure-mode columns do.

Built in: CartPole (v0 and v1). Its labels, checked in this order:

- ``survived``: the episode was truncated (hit the step limit), or it was not terminated at all.
  An episode whose pole falls on the very step the limit is hit counts as survived: its return is
  the maximum.
- ``cart_out``: ``|x| > x_threshold`` (2.4), the cart left the track.
- ``pole_left`` / ``pole_right``: ``|theta| > theta_threshold_radians`` (12 degrees, 0.2095 rad);
  ``theta < 0`` is ``pole_left``. Gymnasium's theta is positive clockwise, so a positive theta
  leans the pole's tip toward +x, the right; the seed post's table names the sides the other way
  round ("left" for theta >= +0.209), which this module does not follow.
- ``terminated``: terminated inside every bound (a modified CartPole); not expected in practice.

Unregistered envs get :func:`fallback`: ``truncated`` or ``terminated``. Register your own::

    def lander(last_obs, terminated, truncated, info, env):
        if truncated or not terminated:
            return "truncated"
        return "crashed" if env.unwrapped.game_over or abs(last_obs[0]) >= 1 else "landed"

    register("LunarLander-v3", lander, modes=("landed", "crashed", "truncated"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Classifier", "CARTPOLE_MODES", "register", "classifier_for", "modes_for", "classify", "fallback", "cartpole"]

Classifier = Callable[[Any, bool, bool, Any, Any], str]

CARTPOLE_MODES = ("pole_left", "pole_right", "cart_out", "survived")
_FALLBACK_MODES = ("terminated", "truncated")

_registry: dict[str, tuple[Classifier, tuple[str, ...]]] = {}


def register(env_id: str, fn: Classifier, *, modes: Sequence[str] = ()) -> None:
    """Use ``fn`` to classify the ends of ``env_id`` episodes (replacing any earlier one).

    ``modes`` lists the labels ``fn`` can return, so tables show a column (of zeros) even for a
    mode no episode ended in; labels outside it are still counted.
    """
    if not callable(fn):
        raise TypeError(f"classifier for {env_id!r} must be callable, got {type(fn).__name__}")
    _registry[env_id] = (fn, tuple(modes))


def classifier_for(env_id: str | None) -> Classifier | None:
    """The classifier registered for ``env_id``, or None."""
    entry = _registry.get(env_id) if env_id else None
    return entry[0] if entry else None


def modes_for(env_id: str | None) -> tuple[str, ...]:
    """The labels the classifier of ``env_id`` declared (the fallback's two for an unregistered env)."""
    entry = _registry.get(env_id) if env_id else None
    return entry[1] if entry else _FALLBACK_MODES


def fallback(last_obs: Any, terminated: bool, truncated: bool, info: Any, env: Any) -> str:
    """For envs without a classifier: ``truncated`` when truncated, else ``terminated``."""
    return "truncated" if truncated else "terminated"


def classify(env_id: str | None, last_obs: Any, terminated: bool, truncated: bool, info: Any = None, env: Any = None) -> str:
    """The label of one episode end, by the registered classifier or :func:`fallback`."""
    fn = classifier_for(env_id) or fallback
    return fn(last_obs, bool(terminated), bool(truncated), info, env)


def cartpole(last_obs: Any, terminated: bool, truncated: bool, info: Any, env: Any) -> str:
    """CartPole's episode end; thresholds from ``env.unwrapped`` when given, else gymnasium's."""
    if truncated or not terminated:
        return "survived"
    base = getattr(env, "unwrapped", env)
    x_max = float(getattr(base, "x_threshold", 2.4))
    theta_max = float(getattr(base, "theta_threshold_radians", 12 * 2 * math.pi / 360))
    x, theta = float(last_obs[0]), float(last_obs[2])
    if abs(x) > x_max:
        return "cart_out"
    if abs(theta) > theta_max:
        return "pole_left" if theta < 0 else "pole_right"
    return "terminated"


for _id in ("CartPole-v0", "CartPole-v1"):
    register(_id, cartpole, modes=CARTPOLE_MODES)

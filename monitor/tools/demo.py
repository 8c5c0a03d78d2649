"""The demo: a PPO CartPole policy, knocked about by random pushes, streamed through every part.

``interlatent demo`` starts the services (an embedded Redis, the monitor with the rules in
``deploy/demo-rules.yaml``, an explainer worker and the panel), then streams the cached demo
policy (:func:`monitor.experiments.agents.demo_policy`, trained once) at a steady pace. The pushes
make its episodes end in more than one way (the pole falls left or right; some survive), so the
monitor has failures to learn early warnings from. After a warm-up the monitor trains a 4-latent
transcoder on the hidden layer; its latents are encoded live, explained, and watched by a
latent-spike rule. Once the latents exist the demo steers one of them for a few episodes and
takes the steer off again, so the effect on returns can be read beside the episodes before it.

``--headless`` runs until every part has shown (at most ``HEADLESS_STEPS``, a minute), or exactly
``--steps`` steps, and prints what each part showed (:func:`monitor.tools.demo_summary.summary`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.experiments.agents import CARTPOLE_OBS, DEMO_TAPS, TRAIN_STEPS, demo_policy, make_ppo
from monitor.store.keys import LATENT_PREFIX
from monitor.store.records import ConfigError, Store, connect

__all__ = [
    "CARTPOLE_OBS",
    "DEMO_TAPS",
    "DEMO_RUN",
    "DEMO_RULES",
    "HEADLESS_STEPS",
    "DemoConfig",
    "Episode",
    "Pushes",
    "SteerPlan",
    "make_ppo",
    "demo_policy",
    "run_agent",
    "run_demo",
]

log = logging.getLogger(__name__)

DEMO_RUN = "cartpole-demo"
DEMO_RULES = Path(__file__).resolve().parents[2] / "deploy" / "demo-rules.yaml"
HEADLESS_STEPS = 12_000  # the most --headless runs by default: a minute at 200 steps/s (every part shows in about 30 s)
Out = Callable[[str], None]


@dataclass(frozen=True)
class Pushes:
    """Random kicks: on a step with probability ``prob``, the pole's angular velocity gains
    ``spin`` rad/s or the cart's velocity ``shove`` m/s, either sign. The trained policy rides out
    most of them and loses some, falling either way."""

    prob: float = 0.01
    spin: float = 1.0
    shove: float = 2.0

    def kick(self, env: Any, rng: np.random.Generator) -> bool:
        if self.prob <= 0 or rng.random() >= self.prob:
            return False
        state = env.unwrapped.state
        i, size = (3, self.spin) if rng.random() < 0.5 else (1, self.shove)
        state[i] += size * rng.choice((-1.0, 1.0))
        return True


@dataclass(frozen=True)
class Episode:
    step: int  # the agent's step at the episode's last step
    ret: float
    mode: str  # monitor.experiments.failure_modes' CartPole labels: pole_left, pole_right, cart_out, survived


def run_agent(
    model: Any,
    tap: Any,
    *,
    steps: int | None,
    on_tick: Callable[[int, list[Episode]], bool | None] | None = None,
    tick_s: float = 0.5,
    seed: int = 0,
    rate: float = 200.0,
    pushes: Pushes | None = None,
    episodes: list[Episode] | None = None,
) -> list[Episode]:
    """Run the policy on CartPole for ``steps`` steps (forever if None) at ``rate`` steps per
    second (0: as fast as it goes), with ``pushes``, calling ``on_tick(steps so far, episodes)``
    every ``tick_s`` (it returns True to stop early); returns every episode that ended, appended
    to ``episodes`` when given (so a Ctrl-C keeps them)."""
    import gymnasium as gym

    from monitor.experiments.failure_modes import classify

    rng = np.random.default_rng(seed)
    env = tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=seed)
    episodes = [] if episodes is None else episodes
    ep_ret = 0.0
    t0 = next_tick = time.monotonic()
    n = 0
    while steps is None or n < steps:
        if pushes is not None:
            pushes.kick(env, rng)
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, info = env.step(action)
        ep_ret += float(reward)
        n += 1
        if terminated or truncated:
            episodes.append(Episode(tap.step - 1, ep_ret, classify("CartPole-v1", obs, terminated, truncated, info, env)))
            ep_ret = 0.0
            obs, _ = env.reset()
        now = time.monotonic()
        if on_tick is not None and now >= next_tick:
            next_tick = now + tick_s
            if on_tick(n, episodes):
                break
        if rate > 0 and (ahead := t0 + n / rate - now) > 0:
            time.sleep(ahead)
    env.close()
    return episodes


def latent_tap(store: Store, run: str) -> str | None:
    """The run's first latent tap that has streamed (the auto-trained transcoder's)."""
    return next((t for t in sorted(store.taps(run)) if t.startswith(LATENT_PREFIX)), None)


class SteerPlan:
    """One steer, applied and reverted: once the latents stream and ``before`` episodes have ended
    with them, add alpha times one latent's decoder direction at the tap the transcoder writes for
    ``during`` episodes, then clear it (the request ``interlatent steer`` and the panel's steer box
    make) and watch ``after`` more. The latent and alpha are :func:`strongest_nudge`'s."""

    def __init__(
        self, store: Store, run: str, model: Any, *, out: Out, before: int = 6, during: int = 10, after: int = 6
    ) -> None:
        self.store, self.run, self.model, self.out = store, run, model, out
        self.before, self.during, self.after = before, during, after
        self.state = "waiting"  # -> baseline -> asked -> on -> clearing -> after -> done
        self.mark = 0  # episodes ended when the current state began
        self.target: tuple[str, int, float, float, float] | None = (
            None  # (transcoder, latent, alpha, rollout return without, with)
        )
        self.steps: list[int] = []  # the agent's step when it applied the steer, and when it reverted it

    def tick(self, n: int, episodes: list[Episode]) -> None:
        from monitor.service.steering import build_intervention, clear_interventions, set_interventions

        st = self.store.steering(self.run)
        if self.state == "waiting":
            if latent_tap(self.store, self.run) and st["control"] is True:
                self.state, self.mark = "baseline", len(episodes)
        elif self.state == "baseline" and len(episodes) - self.mark >= self.before:
            tap = latent_tap(self.store, self.run)
            info = next((t for t in self.store.transcoders() if tap == LATENT_PREFIX + t["name"]), None)
            if info is None:
                return
            j, alpha, before, after = strongest_nudge(self.model, info["path"])
            self.target = (info["name"], j, alpha, before, after)
            try:
                msg = build_intervention(self.store, self.run, latent=j, op="add", transcoder=info["name"], alpha=alpha)
            except ConfigError as e:
                self.out(f"steer skipped: {e}")
                self.state = "done"
                return
            set_interventions(self.store.r, self.run, [msg])
            self.state = "asked"
        elif self.state == "asked" and self.target is not None and st["active"]:
            self.state, self.mark = "on", len(episodes)
            self.steps.append(n)
            name, j, alpha, before, after = self.target
            self.out(
                f"step {n}: steering {LATENT_PREFIX}{name}/{j} (add alpha={alpha:+g}; a quick rollout without pushes took "
                f"the return from {before:g} to {after:g}) for {self.during} episodes"
            )
        elif self.state == "on" and len(episodes) - self.mark >= self.during:
            clear_interventions(self.store.r, self.run)
            self.state = "clearing"
        elif self.state == "clearing" and not st["active"]:
            self.state, self.mark = "after", len(episodes)
            self.steps.append(n)
            self.out(f"step {n}: steer taken off; `interlatent steer --run {self.run}` shows its effect")
        elif self.state == "after" and len(episodes) - self.mark >= self.after:
            self.state = "done"


def strongest_nudge(
    model: Any, path: str, *, alphas: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0, 24.0), episodes: int = 2, cap: int = 200
) -> tuple[int, float, float, float]:
    """The latent and the smallest alpha (either sign) whose decoder direction, added to the demo
    policy's first hidden layer, at least halves its return in a quick rollout here (``episodes``
    episodes of at most ``cap`` steps, no pushes): (latent, alpha, return without, with); the
    strongest one when none halves it. The policy corrects small offsets (a nudge of a few units
    is balanced away), so the alphas that matter are large. Rolled out with the modules'
    ``forward``, so no hook runs and nothing streams."""
    import gymnasium as gym
    import torch

    from monitor.transcoders.artifacts import load_artifact

    tc, _ = load_artifact(path)
    net, head = model.policy.mlp_extractor.policy_net, model.policy.action_net
    env = gym.make("CartPole-v1")

    def mean_return(offset: torch.Tensor | None) -> float:
        total = 0.0
        for ep in range(episodes):
            obs, _ = env.reset(seed=ep)
            for _ in range(cap):
                h = net[1].forward(net[0].forward(torch.as_tensor(obs, dtype=torch.float32)[None]))
                if offset is not None:
                    h = h + offset
                action = int(head.forward(net[3].forward(net[2].forward(h))).argmax())
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                if terminated or truncated:
                    break
        return total / episodes

    with torch.no_grad():
        base = mean_return(None)
        best = (0, alphas[-1], base, base)
        for alpha in alphas:
            for j in range(int(tc.W_dec.shape[0])):
                for sign in (-1.0, 1.0):
                    got = mean_return(sign * alpha * tc.W_dec[j].float())
                    if got < best[3]:
                        best = (j, sign * alpha, base, got)
            if best[3] <= base / 2:
                break
    env.close()
    return best[0], best[1], round(best[2], 1), round(best[3], 1)


@dataclass(frozen=True)
class DemoConfig:
    headless: bool = False
    steps: int | None = None  # None: until Ctrl-C (HEADLESS_STEPS with headless)
    train_steps: int = TRAIN_STEPS
    warmup_steps: int = 1000
    rate: float = 200.0
    pushes: Pushes = Pushes()
    steer: bool = True
    rules: Path = DEMO_RULES
    panel_port: int | None = None  # None: no panel
    until_shown: bool = False  # stop before ``steps`` once every part has shown (_Narrator.shown)
    wait_s: float = 20.0  # after the last step, how long to wait for what is still being explained


def _monitor_args(cfg: DemoConfig) -> list[str]:
    from monitor.alerts.rules import RulesError, load_rules

    if not Path(cfg.rules).exists():
        raise ConfigError(f"no rules file {cfg.rules}: pass --rules FILE (deploy/demo-rules.yaml ships with the repository)")
    try:
        load_rules(cfg.rules)  # one line here, not in the monitor's log
    except RulesError as e:
        raise ConfigError(str(e)) from e
    return [
        "--rules",
        str(Path(cfg.rules).resolve()),
        "--auto-train",
        f"{DEMO_TAPS[0]}>{DEMO_TAPS[1]}",
        "--auto-train-steps",
        str(cfg.warmup_steps),
        "--auto-train-latents",
        "4",
        "--metrics-port",
        "-1",
    ]


class _Narrator:
    """Says once, as it happens, when each part first shows: the transcoder, its latents, an
    explanation, an alert on a latent."""

    def __init__(self, store: Store, run: str, out: Out, every_s: float = 5.0) -> None:
        self.store, self.run, self.out, self.every_s = store, run, out, every_s
        self.said: set[str] = set()
        self.next = time.monotonic() + every_s

    def tick(self, n: int, episodes: list[Episode]) -> None:
        s, run = self.store, self.run
        if "transcoder" not in self.said:
            tc = next((t for t in s.transcoders() if t["run"] == run), None)
            if tc is not None:
                q = tc.get("quality") or {}
                self.say("transcoder", f"step {n}: transcoder {tc['name']} trained ({tc['d_sae']} latents, FVU {q.get('fvu')})")
        tap = latent_tap(s, run)
        if tap is not None:
            self.say("latents", f"step {n}: its latents stream as {tap}")
            if "explained" not in self.said and s.explanation(run, tap, 0) is not None:
                self.say("explained", f"step {n}: latents explained (`interlatent explanations --run {run}`)")
            if "alert" not in self.said:
                hit = next((a for _, a in s.last_alerts(run, 50) if a.get("unit") == "latent" and a["state"] == "firing"), None)
                if hit is not None:
                    self.say("alert", f"step {n}: alert {hit['rule']} firing on {hit['tap']} latent {hit['latent']}")
        if time.monotonic() >= self.next:
            self.next = time.monotonic() + self.every_s
            r = next((r for r in s.status()["runs"] if r["run"] == run), None)
            if r is not None:
                self.out(
                    f"step {n}: monitor sees steps {r['steps']}, episodes {r['episodes']} "
                    f"(mean return {r['return_mean_100']:.1f}), drops {r['drops']}"
                )

    def shown(self, episodes: list[Episode], plan: SteerPlan | None) -> bool:
        """Every part has shown: the transcoder, its latents explained, an alert on a latent, the
        steer applied and reverted (unless off), and failures of more than one mode."""
        failures = {e.mode for e in episodes if e.mode != "survived"}
        return (
            {"transcoder", "latents", "explained", "alert"} <= self.said
            and len(failures) > 1
            and (plan is None or plan.state == "done")
        )

    def say(self, what: str, line: str) -> None:
        if what not in self.said:
            self.said.add(what)
            self.out(line)


def _wait_explained(store: Store, run: str, timeout_s: float) -> None:
    """Until every latent that streamed (and every alerting one) has an explanation, or timeout."""
    tap = latent_tap(store, run)
    if tap is None:
        return
    width = store.taps(run)[tap]["width"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(store.explanation(run, tap, j) is None for j in range(width)):
        time.sleep(0.25)


def run_demo(cfg: DemoConfig, *, data_dir: Path, redis_url: str | None, endpoint: str, out: Out) -> int:
    """Start the services, stream the demo agent, print what it showed; returns the exit code."""
    import agent_side
    from monitor.tools.services import Services

    steps = cfg.steps if cfg.steps is not None else (HEADLESS_STEPS if cfg.headless else None)
    until_shown = cfg.until_shown or (cfg.headless and cfg.steps is None)
    services = Services(
        data_dir=data_dir,
        redis_url=redis_url,
        endpoint=endpoint,
        log_dir=data_dir / "logs",
        extra_monitor_args=_monitor_args(cfg),
        panel_port=None if cfg.headless else cfg.panel_port,
    )
    try:
        model = demo_policy(data_dir, train_steps=cfg.train_steps, progress=out)
        try:
            services.start()
        except RuntimeError as e:  # the monitor did not come up: one line naming its log
            raise ConfigError(str(e)) from e
        assert services.redis_url is not None
        store = Store(connect(services.redis_url))
        out(f"redis {services.redis_url}; monitor on {endpoint} with rules {cfg.rules}; logs in {data_dir / 'logs'}")
        if services.panel_url:
            out(f"panel: {services.panel_url}  (open it in a browser)")
        run = fresh_run(store)
        narrator = _Narrator(store, run, out)
        plan = SteerPlan(store, run, model, out=out) if cfg.steer else None

        def tick(n: int, episodes: list[Episode]) -> bool:
            narrator.tick(n, episodes)
            if plan is not None:
                plan.tick(n, episodes)
            if until_shown and narrator.shown(episodes, plan):
                out(f"step {n}: every part has shown")
                return True
            return False

        episodes: list[Episode] = []
        # the monitor's public key, which the agent's control channel checks (the monitor wrote it at start)
        key = {"monitor_key": str(data_dir / "curve" / "monitor.key")} if cfg.steer else {}
        with agent_side.attach(model.policy, DEMO_TAPS, run=run, endpoint=endpoint, allow_control=cfg.steer, **key) as tap:
            tap.wait_for_monitor(10)
            out(
                f"streaming {DEMO_TAPS} of the PPO CartPole policy (random pushes on {cfg.pushes.prob:.0%} of steps) "
                f"as run {run!r} at {cfg.rate:g} steps/s" + ("" if steps else "; Ctrl-C stops")
            )
            try:
                run_agent(
                    model,
                    tap,
                    steps=steps,
                    on_tick=tick,
                    rate=cfg.rate,
                    pushes=cfg.pushes,
                    episodes=episodes,
                )
            except KeyboardInterrupt:
                pass
            sent = tap.counters()
        wait_until_flushed(store, run, sent["step"])
        if steps:
            _wait_explained(store, run, cfg.wait_s)
        from monitor.tools.demo_summary import summary

        for line in summary(store, run, episodes, plan):
            out(line)
        out(f"done: {len(episodes)} episodes, agent sent {sent['sent']} messages, dropped {sent['drops']} records")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        services.stop()


def fresh_run(store: Store) -> str:
    """``cartpole-demo``, or ``cartpole-demo-2``, ``-3``... where an earlier demo's run is still in
    Redis: each demo streams, trains and alerts from its own step 0."""
    have = set(store.runs())
    k = 2
    name = DEMO_RUN
    while name in have:
        name, k = f"{DEMO_RUN}-{k}", k + 1
    return name


def wait_until_flushed(store: Store, run: str, steps: int, timeout_s: float = 5.0) -> None:
    """Until the monitor has written the run's last step (one flush), or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = next((r for r in store.status()["runs"] if r["run"] == run), None)
        if r is not None and r["steps"] >= steps:
            return
        time.sleep(0.1)

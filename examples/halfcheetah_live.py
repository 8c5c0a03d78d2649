"""A SAC policy on gymnasium's MuJoCo HalfCheetah, watched live through the whole pipeline.

The policy (stable-baselines3 SAC, trained briefly once and cached as safetensors, like the demo's
PPO policy) streams its actor's input and first hidden layer into a monitor that auto-trains an
8-latent transcoder after a warm-up, encodes the latents live, watches them with a latent-spike
rule and has an explainer label them; the panel (``--panel``) shows it all, and the run page's
"what the agent is thinking" strip names the latents most active at each refresh. At the end the
script prints the latents with their labels and scores, the alerts on latents, and the strip as it
stands. It streams until the latents are explained (at least ``--steps`` steps, at most
``--max-steps``).

    pip install "gymnasium[mujoco]"          # MuJoCo is not among the project's own dependencies
    .venv/bin/python examples/halfcheetah_live.py [--panel] [--steps 3000] [--train-steps 5000] [--rate 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ENV = "HalfCheetah-v5"
TAPS = ["actor.latent_pi.0:in", "actor.latent_pi.1:out"]
RUN = "halfcheetah-sac"
# gymnasium's HalfCheetah observation: 8 positions (the root's x is left out), then 9 velocities
OBS = [
    "rootz", "rooty", "bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot",
    "rootx_vel", "rootz_vel", "rooty_vel", "bthigh_vel", "bshin_vel", "bfoot_vel", "fthigh_vel", "fshin_vel", "ffoot_vel",
]  # fmt: skip
RULES = """
rules:
  - name: latent-spike
    kind: zscore
    tap: "latents:*"
    z: 4
    for: 2
    cooldown: 50
    severity: warning
"""


def missing_mujoco() -> str | None:
    """Why the example cannot run here, or None."""
    try:  # what gym.make(ENV) imports, without building a model (MuJoCo logs a warning file where it does)
        import gymnasium.envs.mujoco.half_cheetah_v5  # noqa: F401
        import mujoco  # noqa: F401
    except Exception as e:  # gymnasium raises DependencyNotInstalled, or an ImportError of mujoco itself
        return f'{ENV} needs MuJoCo: pip install "gymnasium[mujoco]" ({type(e).__name__}: {e})'
    return None


def sac_policy(data_dir: Path, *, train_steps: int, seed: int = 0):  # noqa: ANN201 - an SB3 SAC model
    """The SAC model: loaded from ``data_dir/examples`` or trained once and saved there (safetensors)."""
    import gymnasium as gym
    from safetensors.torch import load_file, save_file
    from stable_baselines3 import SAC

    model = SAC("MlpPolicy", gym.make(ENV), seed=seed, device="cpu", verbose=0, learning_starts=min(1000, train_steps // 2))
    cache = data_dir / "examples"
    weights, meta = cache / "sac_halfcheetah.safetensors", cache / "sac_halfcheetah.json"
    if weights.exists() and meta.exists() and json.loads(meta.read_text()).get("train_steps") == train_steps:
        model.policy.load_state_dict(load_file(str(weights)))
        return model
    print(f"training SAC on {ENV} for {train_steps} steps (once; cached in {cache})", flush=True)
    t0 = time.monotonic()
    model.learn(total_timesteps=train_steps)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.policy.state_dict().items()}, str(weights))
    meta.write_text(json.dumps({"train_steps": train_steps, "algo": "SAC", "env": ENV, "train_s": time.monotonic() - t0}))
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="stream at least this many steps")
    p.add_argument("--max-steps", type=int, default=30000, help="stream at most this many, latents explained or not")
    p.add_argument("--train-steps", type=int, default=5000, help="SAC training steps for the cached policy")
    p.add_argument("--warmup-steps", type=int, default=1000, help="steps recorded before the monitor trains the transcoder")
    p.add_argument("--latents", type=int, default=8)
    p.add_argument("--rate", type=float, default=300.0, help="steps per second (0: as fast as it goes)")
    p.add_argument("--data-dir", help="where the policy is cached and the services keep their data (default: a temporary one)")
    p.add_argument("--panel", action="store_true", help="serve the panel too and keep streaming until Ctrl-C")
    p.add_argument("--json", action="store_true", help="end with one JSON line of what it showed")
    a = p.parse_args()
    if min(a.steps, a.max_steps, a.train_steps, a.warmup_steps, a.latents) < 1 or a.max_steps < a.steps or a.rate < 0:
        print("halfcheetah_live: every count must be at least 1, --max-steps at least --steps, --rate >= 0", file=sys.stderr)
        return 2
    why = missing_mujoco()
    if why:
        print(f"halfcheetah_live: {why}", file=sys.stderr)
        return 2

    import gymnasium as gym
    import torch

    import agent_side
    from monitor.cli.live import PANEL_PORT
    from monitor.panel.runs import thinking
    from monitor.store.embedded import free_port
    from monitor.store.records import Store, connect
    from monitor.tools.services import Services

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data_dir or tmp)
        model = sac_policy(data, train_steps=a.train_steps)
        (data / "halfcheetah-rules.yaml").write_text(RULES)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        monitor_args = ["--rules", str(data / "halfcheetah-rules.yaml"), "--metrics-port", "-1"]
        monitor_args += ["--auto-train", f"{TAPS[0]}>{TAPS[1]}", "--auto-train-steps", str(a.warmup_steps)]
        monitor_args += ["--auto-train-latents", str(a.latents)]
        services = Services(
            data_dir=data,
            endpoint=endpoint,
            log_dir=data / "logs",
            extra_monitor_args=monitor_args,
            panel_port=PANEL_PORT if a.panel else None,
        )
        with services:
            store = Store(connect(services.redis_url or ""))
            if services.panel_url:
                print(f"panel: {services.panel_url}/?page=Run&run={RUN}", flush=True)
            tap_name = None
            steps = 0
            with agent_side.attach(model.policy, TAPS, run=RUN, endpoint=endpoint) as tap:
                tap.wait_for_monitor(10)
                env = tap.wrap(gym.make(ENV), obs_names=OBS)
                obs, _ = env.reset(seed=0)
                explained = False
                t0 = time.monotonic()
                try:
                    while steps < a.max_steps and (a.panel or steps < a.steps or not explained):
                        if a.rate > 0 and (ahead := t0 + steps / a.rate - time.monotonic()) > 0:
                            time.sleep(ahead)  # a live agent's pace (an unpaced one outruns the warm-up recording)
                        action, _ = model.predict(obs, deterministic=True)
                        obs, _, terminated, truncated, _ = env.step(action)
                        steps += 1
                        if terminated or truncated:
                            obs, _ = env.reset()
                        if steps % 250 == 0:
                            tap_name = next((t for t in store.taps(RUN) if t.startswith("latents:")), None)
                            explained = tap_name is not None and store.explanation(RUN, tap_name, 0) is not None
                            if steps % 2000 == 0:
                                print(f"step {steps}: latents {tap_name or 'not yet'}, explained: {explained}", flush=True)
                except KeyboardInterrupt:
                    pass
                env.close()
            deadline = time.monotonic() + 5
            while (
                time.monotonic() < deadline and next((r["steps"] for r in store.status()["runs"] if r["run"] == RUN), 0) < steps
            ):
                time.sleep(0.1)  # the monitor's last flush
            report = _report(store, tap_name, steps, thinking(store, RUN))
    print(json.dumps(report) if a.json else "\n".join(report["lines"]))
    return 0


def _report(store, tap: str | None, steps: int, strip: list[dict]) -> dict:  # noqa: ANN001 - a monitor.store Store
    tc = next((t for t in store.transcoders() if t["run"] == RUN), None)
    lines = [f"== {RUN}: SAC on {ENV}, {steps} steps streamed =="]
    latents = []
    if tc is None or tap is None:
        lines.append("no latents yet: stream more --steps (the transcoder trains after --warmup-steps)")
    else:
        q = tc.get("quality") or {}
        lines.append(f"transcoder {tc['name']}: {tc['d_sae']} latents, FVU {q.get('fvu')}, L0 {q.get('l0')}; streaming as {tap}")
        for j in range(store.taps(RUN)[tap]["width"]):
            e = store.explanation(RUN, tap, j) or {}
            sc = e.get("score") or {}
            latents.append({"latent": j, "label": e.get("label"), "detection": sc.get("balanced_accuracy")})
            lines.append(f"  latent {j}: {e.get('label', 'not explained yet')!r} (detection {sc.get('balanced_accuracy')})")
    alerts = [a for a in store.alerts(RUN) if a.get("state") == "firing" and a.get("unit") == "latent"]
    lines.append(f"alerts firing on latents: {len(alerts)}")
    lines.append("what the agent is thinking now: " + ("; ".join(
        f"latent {f['latent']} {f['label'] or '(unexplained)'} z {f['z']:+.1f}" + (f" [{', '.join(f['alerts'])}]" if f["alerts"] else "")
        for f in strip
    ) or "no latent above 0"))  # fmt: skip
    return {
        "run": RUN,
        "steps": steps,
        "transcoder": tc["name"] if tc else None,
        "latent_tap": tap,
        "latents": latents,
        "alerts_on_latents": len(alerts),
        "thinking": [{k: f[k] for k in ("latent", "label", "z", "value", "alerts")} for f in strip],
        "lines": lines,
    }


if __name__ == "__main__":
    sys.exit(main())

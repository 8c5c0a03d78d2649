"""`interlatent keys`: the CURVE keys that prove who is who on the monitor's channels.

    interlatent keys monitor            # the monitor's public key (made in DATA_DIR/curve on first use)
    interlatent keys agent NAME --out D # a keypair for a remote agent: D/NAME.key (public), D/NAME.key_secret

An agent that accepts steering is given the monitor's public key (``attach(monitor_key=...)``,
``$INTERLATENT_MONITOR_KEY``, or the file ``DATA_DIR/curve/monitor.key``). A remote agent also
holds a keypair of its own (``attach(agent_key=".../NAME.key_secret")``) whose public file the
monitor lists in ``--allow-keys DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from monitor.cli.common import Settings
from monitor.store.records import ConfigError

__all__ = ["add_parsers", "cmd_keys"]


def cmd_keys(args: argparse.Namespace, s: Settings) -> int:
    import zmq.auth

    from monitor.service.curve import KEY_DIR, PUBLIC_FILE, monitor_keypair

    if args.keys_cmd == "agent":
        if not args.name or "/" in args.name or args.name.startswith(".") or not args.name.isprintable():
            raise ConfigError(f"agent key name {args.name!r}: a plain file name, please")
        out = Path(args.out or s.data_dir / "agent-keys").expanduser()
        out.mkdir(parents=True, exist_ok=True)
        if (out / f"{args.name}.key_secret").exists():
            raise ConfigError(f"{out / (args.name + '.key_secret')} exists: pick another NAME or remove it")
        public, secret = zmq.auth.create_certificates(str(out), args.name)
        os.chmod(secret, 0o600)
        doc = {"public": public, "secret": secret}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"agent keypair: {secret} (keep it on the agent's host: attach(agent_key=...))")
            print(f"its public key: {public} (copy it into the monitor's --allow-keys folder)")
        return 0
    try:
        key, _ = monitor_keypair(s.data_dir)
    except OSError as e:
        raise ConfigError(f"cannot read or make the monitor's keypair in {s.data_dir / KEY_DIR}: {e}") from e
    doc = {"public_key": key.decode(), "file": str(s.data_dir / KEY_DIR / PUBLIC_FILE)}
    print(json.dumps(doc) if args.json else f"{doc['public_key']}  ({doc['file']})")
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("keys", help="the monitor's public key, or a keypair for a remote agent")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_keys, keys_cmd="monitor")
    keys_sub = sp.add_subparsers(dest="keys_cmd")
    mp = keys_sub.add_parser("monitor", help="print the monitor's public key (made on first use)")
    mp.add_argument("--data-dir", default=argparse.SUPPRESS, help="the monitor's data directory")
    mp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    ap = keys_sub.add_parser("agent", help="make a keypair for a remote agent")
    ap.add_argument("name")
    ap.add_argument("--out", help="folder for NAME.key and NAME.key_secret (default DATA_DIR/agent-keys)")
    ap.add_argument("--data-dir", default=argparse.SUPPRESS, help="the data directory")
    ap.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

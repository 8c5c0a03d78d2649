"""`interlatent panel`: the live Streamlit panel (and the commands that act on a live agent)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from monitor.cli.common import Settings
from monitor.store.embedded import port_free
from monitor.store.records import connect, resolve_redis_url

__all__ = ["add_parsers", "cmd_panel", "panel_command", "PANEL_PORT"]

PANEL_APP = Path(__file__).resolve().parent.parent / "panel" / "app.py"
PANEL_PORT = 8501


def panel_command(redis_url: str, *, port: int, address: str = "127.0.0.1") -> list[str]:
    """The Streamlit command line that serves the panel."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(PANEL_APP),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--",
        "--redis",
        redis_url,
    ]


def cmd_panel(args: argparse.Namespace, s: Settings) -> int:
    url = resolve_redis_url(s.redis_url, s.data_dir)
    connect(url).close()  # a clear error now, not a red box in the browser
    if not port_free(args.port, args.address):
        print(f"interlatent: port {args.port} is taken; pass --port", file=sys.stderr)
        return 2
    print(f"panel on http://{args.address}:{args.port}  (Redis {url})", flush=True)
    os.execv(sys.executable, panel_command(url, port=args.port, address=args.address))
    return 0  # not reached


def add_parsers(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("panel", help="serve the live Streamlit panel (reads Redis only)")
    common(sp)
    sp.add_argument("--port", type=int, default=PANEL_PORT)
    sp.add_argument("--address", default="127.0.0.1", help="interface to serve on (0.0.0.0 for every one)")
    sp.set_defaults(fn=cmd_panel)

"""An agent process for the scale-out test: a small torch module attached through
``$INTERLATENT_ENDPOINTS``, one forward of one row every ``PERIOD_S`` until the file ``argv[2]``
exists; then it detaches and writes its counters as JSON to ``argv[3]``.

    python tier_agent.py RUN STOP_FILE OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from agent_side import attach
from monitor.tools.scale import paced_forwards

PERIOD_S = 0.005


def main() -> None:
    run, stop, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    att = attach(net, ["0:out"], run=run, flush_rows=8, flush_ms=20)
    forwards = paced_forwards(net, torch.randn(1, 8), PERIOD_S, stop.exists)
    att.detach()
    out.write_text(json.dumps({**att.counters(), "forwards": forwards}))


if __name__ == "__main__":
    main()

"""The monitor's CURVE keypair: what proves to agents that a control socket is the monitor's.

Kept in ``DATA_DIR/curve/`` as ZeroMQ certificate files (``monitor.key``, the public key an agent
is given; ``monitor.key_secret``, readable by its owner only), made on the monitor's first start.
A monitor with no data directory makes a keypair for its lifetime only (tests).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import zmq
import zmq.auth

__all__ = ["Keypair", "monitor_keypair", "KEY_DIR", "PUBLIC_FILE", "SECRET_FILE"]

log = logging.getLogger(__name__)

KEY_DIR = "curve"
PUBLIC_FILE = "monitor.key"
SECRET_FILE = "monitor.key_secret"

Keypair = tuple[bytes, bytes]  # (public, secret), z85


def monitor_keypair(data_dir: Path | None) -> Keypair:
    """The monitor's keypair from ``data_dir/curve``, made there (atomically: two monitors that
    start at once end with the same one) when it is not there yet; a fresh one without a data dir."""
    if data_dir is None:
        return zmq.curve_keypair()
    folder = Path(data_dir) / KEY_DIR
    secret = folder / SECRET_FILE
    if not secret.exists():
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".curve-", dir=data_dir))  # 0700
        try:
            zmq.auth.create_certificates(str(tmp), "monitor")
            os.chmod(tmp / SECRET_FILE, 0o600)
            os.chmod(tmp / PUBLIC_FILE, 0o644)
            try:
                os.rename(tmp, folder)  # fails if another monitor made it first: theirs is kept
                log.info("made the monitor's CURVE keypair in %s", folder)
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    public, secret_key = zmq.auth.load_certificate(str(secret))
    if secret_key is None:
        raise OSError(f"{secret} holds no secret key")
    return public, secret_key

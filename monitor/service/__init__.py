"""The live monitor: receive loop, per-run state, steering control channel, online encoding, job filing, auto-training."""

__all__: list[str] = []

"""Alert rules (the rules file), the engine that evaluates them per row batch, sinks (Redis stream, webhooks) and /metrics."""

__all__: list[str] = []

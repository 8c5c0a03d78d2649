"""Streaming statistics over all channels at once: moments, rolling and EW correlations, the step joiner, failure profiles. numpy only."""

__all__: list[str] = []

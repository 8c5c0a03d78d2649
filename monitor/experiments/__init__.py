"""Offline experiments on a policy: agent factories, splicing, sweeps, probes, interrogation, comparison, failure modes."""

__all__: list[str] = []

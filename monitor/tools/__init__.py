"""Running it all: the embedded services launcher, the demo, the benchmarks."""

__all__: list[str] = []

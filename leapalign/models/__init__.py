"""Models built in code (no downloads): tiny Flux configs for tests and benchmarks."""

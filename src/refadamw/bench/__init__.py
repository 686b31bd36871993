"""Benchmarks and the demo run. Nothing in the library imports this package."""

"""Benchmarks of esim-agent against the emulator: `python -m bench [--quick]` runs them all."""

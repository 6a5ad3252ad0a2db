"""runwatch's benchmarks: `python -m benchmarks [--quick]`."""

"""Flywheel's benchmarks: each figure a ratio of things measured in one run on the same machine.

`python -m bench` (or `make bench`) runs them all; `--only serving,drift` picks some, `--quick` shrinks the sizes.
Results go to `bench/results/<name>.json` and `bench/results/latest.md`. Nothing here is imported by Flywheel.
"""

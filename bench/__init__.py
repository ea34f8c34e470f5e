"""Benchmarks for esim-bridge, always against baselines measured in the same run.

Shared machines are noisy, so an absolute number from one run says little; the
ratio between the bridge and a baseline that ran minutes earlier on the same
load does. `python -m bench --quick` is what CI runs; it never fails on a number.
"""

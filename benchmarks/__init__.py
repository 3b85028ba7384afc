"""Benchmarks and the one-shot GPU check: speed, recipe and loader measurements that print tables. Nothing in the
product imports this folder. Run each from the project root, e.g. ``python benchmarks/bench_speed.py --help``."""

"""Benchmarks (`make bench`, `make bench-cpu`): each measurement against a physical floor measured in
the same run. Not tests: nothing here asserts."""

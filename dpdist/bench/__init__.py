"""Benchmarks of the DP step against the non-private step: time, memory, FLOP floor and communication."""

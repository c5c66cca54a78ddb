"""Benchmarks: beam_infer side by side with a naive loop and Beam RunInference. See benchmarks/run.py."""

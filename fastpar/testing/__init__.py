"""Helpers for fastpar's tests and benchmarks: multi-process runs and GPU compile reports.

Nothing here is imported by the library itself.
"""

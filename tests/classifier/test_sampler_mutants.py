"""Checks that kill mutants the older tests let through (bench/mutation.py)."""

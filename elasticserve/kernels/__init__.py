"""Segmented kernels for mixed-shape steps, each with its pure-torch reference (reference.py)."""

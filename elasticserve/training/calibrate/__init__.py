"""Calibration: importance orders, per-layer widths, depth tables and bias compensation."""

"""Offline evaluation helpers: a small real model and real text, for quality experiments."""

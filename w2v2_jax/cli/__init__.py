"""The command-line programs (w2v2-train, w2v2-prepare, ...) and what they share (common.py)."""

"""Measuring runs: the metrics log, FLOPs and MFU, memory and its plan, summaries, evaluation."""

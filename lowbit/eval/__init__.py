"""Measurements: perplexity and memory."""
from lowbit.eval.memory import memory_report
from lowbit.eval.perplexity import perplexity

__all__ = ["memory_report", "perplexity"]

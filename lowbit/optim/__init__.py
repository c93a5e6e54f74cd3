"""Optimizers with 8-bit (or paged) state, and StableAdamW."""
from lowbit.optim.optimizers import Adam8bit, AdamW8bit, Lion8bit, LowbitOptimizer, SGD8bit, StableAdamW

__all__ = ["Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "StableAdamW", "LowbitOptimizer"]

"""Strategies of this family (filled in by its implementation)."""

STRATEGY_CLASSES: tuple = ()

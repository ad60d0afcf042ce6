"""Bilevel algorithms: pure init/step functions over explicit NamedTuple state."""
from .algorithm import Algorithm
from .double_loop import DoubleLoopState, double_loop
from .outer import OuterState

__all__ = ["Algorithm", "DoubleLoopState", "OuterState", "double_loop"]

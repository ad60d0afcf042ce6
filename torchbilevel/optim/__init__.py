"""Bilevel algorithms: pure init/step functions over explicit NamedTuple state."""
from .algorithm import Algorithm
from .double_loop import DoubleLoopState, double_loop
from .fdehbo import fdehbo, fmbo
from .outer import OuterState
from .single_loop import SingleLoopState

__all__ = ["Algorithm", "DoubleLoopState", "OuterState", "double_loop", "fdehbo", "fmbo", "SingleLoopState"]

"""Hypergradient estimators: one file per method, each a small config with ``estimate``."""
from .aid import AID, aid
from .base import HypergradAux
from .first_order import FirstOrder, first_order
from .itd import ITD, itd
from .pzobo import PZOBO, pzobo
from .stocbio import StocBiO, stocbio

ESTIMATORS = (AID, ITD, StocBiO, PZOBO, FirstOrder)


def is_estimator(obj) -> bool:
    """True for the configs returned by aid, itd, stocbio, pzobo and first_order."""
    return isinstance(obj, ESTIMATORS)


__all__ = ["AID", "ITD", "StocBiO", "PZOBO", "FirstOrder", "HypergradAux", "aid", "itd", "stocbio", "pzobo",
           "first_order", "is_estimator", "ESTIMATOR_NAMES"]

ESTIMATOR_NAMES = "tb.aid(...), tb.itd(...), tb.stocbio(...), tb.pzobo(...) or tb.first_order()"

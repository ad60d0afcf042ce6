"""Hypergradient estimators: one file per method, each a small config with ``estimate``."""
from .aid import AID, aid
from .base import HypergradAux
from .itd import ITD, itd
from .pzobo import PZOBO, pzobo
from .stocbio import StocBiO, stocbio

ESTIMATORS = (AID, ITD, StocBiO, PZOBO)


def is_estimator(obj) -> bool:
    """True for the configs returned by aid, itd, stocbio and pzobo."""
    return isinstance(obj, ESTIMATORS)


__all__ = ["AID", "ITD", "StocBiO", "PZOBO", "HypergradAux", "aid", "itd", "stocbio", "pzobo",
           "is_estimator"]

"""Bilevel algorithms: pure init/step functions over explicit NamedTuple state."""
from .algorithm import Algorithm
from .amigo import AmIGOState, amigo
from .bome import BOMEState, bome
from .double_loop import DoubleLoopState, double_loop
from .f2sa import F2SAState, f2sa
from .fdehbo import fdehbo, fmbo
from .fsla import FSLAState, fsla
from .ma_soba import ma_soba
from .mrbo import MRBOState, mrbo
from .outer import OuterState
from .saba import SABAState, saba
from .single_loop import SingleLoopState
from .soba import soba
from .srba import SRBAState, srba
from .step_info import StepInfo, progress
from .ttsa import TTSAState, ttsa
from .vrbo import VRBOState, vrbo

__all__ = ["Algorithm", "DoubleLoopState", "OuterState", "double_loop", "fdehbo", "fmbo", "SingleLoopState",
           "soba", "ma_soba", "mrbo", "MRBOState", "f2sa", "F2SAState", "bome", "BOMEState",
           "saba", "SABAState", "srba", "SRBAState", "amigo", "AmIGOState", "fsla", "FSLAState",
           "ttsa", "TTSAState", "vrbo", "VRBOState", "StepInfo", "progress"]

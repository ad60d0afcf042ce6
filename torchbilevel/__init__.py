"""torchbilevel: hypergradients and bilevel optimisers for PyTorch.

    min_x  f(x, y*(x))   s.t.  y*(x) = argmin_y g(x, y)

See README.md for the methods, their papers and costs.
"""
from . import buffers, derivatives, distributed, guards, nn, randomness, solvers, tree
from .estimators import HypergradAux, aid, first_order, itd, pzobo, stocbio
from .hypergrad import hypergrad
from .optim import Algorithm, DoubleLoopState, SingleLoopState, double_loop, fdehbo, fmbo
from .optim import schedule as schedules
from .optim import BOMEState, F2SAState, MRBOState, bome, f2sa, ma_soba, mrbo, soba
from .optim import AmIGOState, FSLAState, SABAState, SRBAState, TTSAState, amigo, fsla, saba, srba, ttsa
from .optim import VRBOState, vrbo
from .optim import StepInfo, progress
from .output_loss import OutputLoss
from .problem import Bilevel
from .solvers import IndefiniteSystemError, SolveInfo, cg, fixed_point, nystrom
from .tasks import over_tasks

__version__ = "0.1.0"

__all__ = ["Bilevel", "OutputLoss", "cg", "fixed_point", "nystrom", "SolveInfo", "IndefiniteSystemError", "solvers", "aid", "itd", "stocbio", "pzobo", "first_order", "hypergrad",
           "buffers", "randomness",
           "HypergradAux", "tree", "derivatives", "distributed", "guards", "nn", "double_loop", "DoubleLoopState",
           "Algorithm", "schedules", "fdehbo", "fmbo", "SingleLoopState",
           "soba", "ma_soba", "mrbo", "MRBOState", "f2sa", "F2SAState", "bome", "BOMEState",
           "saba", "SABAState", "srba", "SRBAState", "amigo", "AmIGOState", "fsla", "FSLAState",
           "ttsa", "TTSAState", "vrbo", "VRBOState",
           "over_tasks", "StepInfo", "progress"]

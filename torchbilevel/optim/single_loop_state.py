"""The state of the single-loop engine (FdeHBO, FMBO, SOBA, MA-SOBA) and its checkpoint."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from .. import sharding as S
from .. import tree as T
from . import donation as D

__all__ = ["SingleLoopState", "RADIUS_WINDOW", "checkpoint"]


class SingleLoopState(NamedTuple):
    """State of FdeHBO / FMBO in flat buffers.

    ``state.x``, ``state.y``, ``state.v`` give dicts (views of the flat buffers).
    Fields: flat iterates ``xf, yf, vf``; momenta ``h_f, h_g, h_R``; the previous iterate
    ``x_prev, y_prev, v_prev`` and its finite-difference step ``delta_prev``; ``step`` t;
    the dict layouts ``layout_x, layout_y``; ``ball_hits``, how many steps the projection
    of v on the ball of radius r bound (‖w‖ > r; a 0-d tensor on the device), and
    ``ball_recent``, the fraction of recent steps (moving average over about
    ``RADIUS_WINDOW`` steps) in which it bound.

    What a run decides lives here too, so that a newly built algorithm that loads a
    ``state_dict`` continues bit for bit and two runs never share decisions:
    ``pair_mode`` (FdeHBO's ± pair: True one vmap, False two evaluations, None not yet
    decided), ``gy_from_pair`` (FdeHBO: ∇y g taken from the pair when the y update and the
    products share a sample — only for objectives without running statistics; None not yet
    decided) and ``warned`` (the radius warning was given in this run).
    """
    xf: Tensor
    yf: Tensor
    vf: Tensor
    h_f: Tensor
    h_g: Tensor
    h_R: Tensor
    x_prev: Tensor
    y_prev: Tensor
    v_prev: Tensor
    delta_prev: object        # float (given delta, and at t = 0) or 0-d tensor (default δ)
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled
    ball_hits: Optional[Tensor] = None
    ball_recent: Optional[Tensor] = None
    pair_mode: Optional[bool] = None
    gy_from_pair: Optional[bool] = None
    warned: bool = False

    @property
    def x(self) -> T.Tree:
        """The outer iterate x_t as a dict of tensors (views of the flat buffer ``xf``)."""
        return self.layout_x.user(self.xf)

    @property
    def y(self) -> T.Tree:
        """The inner iterate y_t as a dict of tensors (views of the flat buffer ``yf``)."""
        return self.layout_y.user(self.yf)

    @property
    def v(self) -> T.Tree:
        """The linear-system iterate v_t (≈ [∇yy g]⁻¹∇y f) as a dict shaped like y."""
        return self.layout_y.user(self.vf)


# The radius warning: the projection bound in most of the last ~RADIUS_WINDOW steps.
RADIUS_WINDOW = 20


def checkpoint(name: str):
    """(state_dict, load_state_dict) of a single-loop run named ``name``."""
    def state_dict(s: SingleLoopState) -> dict:
        """Plain dicts, tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
        D.check_unconsumed(s)
        d = {k: getattr(s, k) for k in SingleLoopState._fields if not k.startswith("layout")}
        for k in ("layout_x", "layout_y"):
            d[k] = S.layout_to_dict(getattr(s, k))
        d["algorithm"] = name
        return d

    def load_state_dict(d: dict) -> SingleLoopState:
        if not isinstance(d, dict) or d.get("algorithm") != name:
            raise ValueError(f"not a {name} checkpoint (expected the dict of state_dict())")
        D.check_unconsumed(d, "state_dict")
        lay = {k: S.layout_from_dict(d[k]) for k in ("layout_x", "layout_y")}
        # (checkpoints older than the decision fields leave them at their defaults: undecided)
        fields = {k: d[k] for k in SingleLoopState._fields if not k.startswith("layout") and k in d}
        return SingleLoopState(**fields, **lay)

    return state_dict, load_state_dict

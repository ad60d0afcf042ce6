"""Step-size and momentum schedules: a number, or a callable of the step t."""
from __future__ import annotations

from typing import Callable, Union

from ..problem import check_positive, check_unit

Schedule = Union[float, Callable[[int], float]]


def value_at(s: Schedule, t: int, name: str, unit: bool = False) -> float:
    """The value of schedule ``s`` at step ``t``, validated (ValueError naming ``name``)."""
    if not callable(s):
        return s
    v = s(t)
    return check_unit(v, f"{name}({t})") if unit else check_positive(v, f"{name}({t})")


def theorem1(w: float = 1.0, c_beta: float = 1.0, c_lambda: float = 1.0,
             c_eta_f: float = 1.0, c_eta_r: float = 1.0, c_eta_g: float = 1.0, scale: float = 1.0):
    """The schedule of Theorem 1/2 of the FdeHBO paper, as keyword arguments for
    ``tb.fdehbo`` / ``tb.fmbo``:

        α_t = scale / (w + t)^{1/3},  β_t = c_β α_t,  λ_t = c_λ α_t,
        η^f_t = c_ηf α_t²,  η^R_t = c_ηR α_t²,  η^g_t = c_ηg α_t²   (clipped to [0, 1])

    ``tb.fdehbo(problem, **tb.schedules.theorem1(w=8), radius=..., delta=...)``.
    ``scale`` multiplies α (the paper's scale is 1); the η's use the unscaled α.
    """
    for name, v in dict(w=w, c_beta=c_beta, c_lambda=c_lambda, c_eta_f=c_eta_f, c_eta_r=c_eta_r,
                        c_eta_g=c_eta_g, scale=scale).items():
        check_positive(v, name)
    a = lambda t: 1.0 / (w + t) ** (1.0 / 3.0)
    eta = lambda c: (lambda t: min(1.0, c * a(t) ** 2))
    return dict(lr_x=lambda t: scale * a(t), lr_y=lambda t: scale * c_beta * a(t),
                lr_v=lambda t: scale * c_lambda * a(t),
                eta_x=eta(c_eta_f), eta_v=eta(c_eta_r), eta_y=eta(c_eta_g))

"""Public entry points: validate the arguments, pick a backend, run it.

``backend="auto"`` runs the Triton kernels for CUDA tensors of a float16,
bfloat16 or float32 storage dtype when triton imports (and the kernels were not
built for the interpreter), the plain-torch reference otherwise (CPU tensors,
float64, no triton). ``"torch"`` always runs the reference. ``"triton"`` always
runs the kernels or raises: RuntimeError when triton does not import or the
tensors sit on a CPU without ``TRITON_INTERPRET=1``, ValueError for float64.
Nothing falls back silently; :func:`triton_launches` counts what the Triton
path launched.
"""
from __future__ import annotations

import functools
import importlib
import sys

import torch

from . import _checks as C
from . import reference

#: storage dtypes the Triton kernels handle (they compute in float32)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: rows of the stacked grads buffer: inner [gy, gy_prev, hv, hv_prev, fy, fy_prev], outer [fx, fx_prev, jv, jv_prev]
INNER_ROWS = 6
OUTER_ROWS = 4


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package imports in this environment (cached)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def _triton():
    """The Triton kernel module, imported on first use."""
    return importlib.import_module(".triton_update", __package__)


def triton_launches() -> dict[str, int]:
    """Kernel launches made by the Triton path so far, per entry point (all zero if never used).

    Does not import triton: the kernel module is only read if it is loaded already.
    """
    module = sys.modules.get(f"{__package__}.triton_update")
    if module is None:
        return {"inner_update": 0, "outer_update": 0, "project_ball": 0}
    return dict(module.LAUNCHES)


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    """Decide the backend for tensors like ``t``; raise when "triton" cannot honour the request."""
    if backend == "torch" or t.numel() == 0:      # (an empty shard: nothing to launch)
        return False
    if backend == "auto":
        return (
            t.is_cuda and t.dtype in TRITON_DTYPES and triton_available() and not _triton().INTERPRETED
        )
    # backend == "triton"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which does not import here")
    if t.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' handles float16, bfloat16 and float32 storage, got {t.dtype}; "
            "use backend='torch' or 'auto'"
        )
    if t.device.type == "cpu":
        if not _triton().INTERPRETED:
            raise RuntimeError(
                "backend='triton' on CPU tensors runs only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before torchbilevel.kernels first uses Triton "
                "(the kernels of this process were built for a GPU)"
            )
    elif t.device.type != "cuda":
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (or CPU ones when interpreted), got {t.device}")
    return True


def inner_update(y, v, h_g, h_R, grads, *, beta, lam, eta_g, eta_R, fd=False, scale_cur=None,
                 scale_prev=None, backend="auto"):
    """Inner side of one FdeHBO / FMBO step, fused: y, the LS iterate w, their momenta, and ‖w‖².

    FdeHBO Alg. 1 lines 4-5 (FMBO Alg. 2 lines 4-5) of Yang, Xiao, Ji (NeurIPS 2023),
    one pass over memory (reads 4 + 6 vectors of length d, writes 4 and one partial
    Σw² per block), computed in float32 (float64 for float64 storage) whatever the
    storage dtype::

        R = hv − fy                     eq. (5) / (8): hv = ∇yy g·v (exact or finite-difference)
        h_g' = η_g·gy_cur + (1−η_g)·(h_g + gy_cur − gy_prev)      eq. (6)
        h_R' = η_R·R_cur + (1−η_R)·(h_R + R_cur − R_prev)          eq. (7) / (12)
        y' = y − β·h_g'                 line 4
        w  = v − λ·h_R'                 line 5
        ‖w‖² = Σ w²                     (of w as stored; feeds the line-6 projection)

    Args:
        y: inner iterate y_t, flat contiguous 1-D buffer of length d
            (float16, bfloat16, float32 or float64; the storage dtype).
        v: linear-system iterate v_t, like ``y``.
        h_g: momentum h^g_{t-1}, like ``y``.
        h_R: momentum h^R_{t-1}, like ``y``.
        grads: stacked rows of length d, dtype and device of ``y``, shape (6, d):
            gy_cur = ∇y g(x_t, y_t; ζ_t), gy_prev = ∇y g(x_{t-1}, y_{t-1}; ζ_t),
            hv_cur = ∇yy g·v_t at (x_t, y_t; ψ_t), hv_prev (the same at the previous
            iterate), fy_cur = ∇y f(x_t, y_t; ψ_t), fy_prev = ∇y f(x_{t-1}, y_{t-1}; ψ_t).
            FdeHBO passes finite-difference products, FMBO exact ones. Contiguous,
            or a row-padded view ``buf[:, :d]`` (a row stride that is a multiple
            of 16 elements lets the GPU kernel use vector loads).
        beta: inner step size β_t (Python float).
        lam: linear-system step size λ_t.
        eta_g: momentum weight η^g_t in [0, 1] (1: no momentum; with 1 the
            h_g and gy_prev values are ignored).
        eta_R: momentum weight η^R_t in [0, 1].
        fd: must be False (the default). The rows always hold finished products;
            the finite-difference row layout (``fd=True``) was removed and raises
            ValueError. Kept so that callers passing ``fd=False`` keep working.
        scale_cur, scale_prev: ignored (None or a finite real number); the 1/(2δ)
            scales of the removed finite-difference layout.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        (y_new, w, h_g_new, h_R_new, w_sqnorm): four new 1-D tensors in the
        storage dtype and the 0-d squared norm of w, float32 (float64 for
        float64 storage), on the same device and never synchronised to the host.
        The inputs are not modified.

    Raises:
        TypeError / ValueError: a wrong type, shape, row count, dtype, device,
            non-contiguous buffer or out-of-range scalar (the message names it);
            an unknown backend; fd=True.
        RuntimeError: backend="triton" cannot run here.
    """
    C.check_backend(backend)
    C.check_products_layout(fd, scale_cur, scale_prev)
    C.check_state("y", y)
    C.check_like("v", v, "y", y)
    C.check_like("h_g", h_g, "y", y)
    C.check_like("h_R", h_R, "y", y)
    C.check_grads(grads, INNER_ROWS, "y", y)
    kw = dict(beta=C.real("beta", beta), lam=C.real("lam", lam),
              eta_g=C.weight("eta_g", eta_g), eta_R=C.weight("eta_R", eta_R))
    impl = _triton() if _use_triton(backend, y) else reference
    return impl.inner_update(y, v, h_g, h_R, grads, **kw)


def outer_update(x, h_f, grads, *, alpha, eta_f, fd=False, scale_cur=None, scale_prev=None, backend="auto"):
    """Outer side of one FdeHBO / FMBO step, fused: the hypergradient momentum and x.

    FdeHBO Alg. 1 line 7 (FMBO Alg. 2 line 7) of Yang, Xiao, Ji (NeurIPS 2023), one
    pass over memory (reads 2 + 4 vectors of length p, writes 2), computed in
    float32 (float64 for float64 storage) whatever the storage dtype::

        F = fx − jv                     eq. (3): jv = ∇xy g·v (exact or finite-difference)
        h_f' = η_f·F_cur + (1−η_f)·(h_f + F_cur − F_prev)           eq. (10) / (13)
        x' = x − α·h_f'                 line 7

    Args:
        x: outer iterate x_t, flat contiguous 1-D buffer of length p (float16,
            bfloat16, float32 or float64; the storage dtype).
        h_f: momentum h^f_{t-1}, like ``x``.
        grads: stacked rows of length p, dtype and device of ``x``, shape (4, p):
            fx_cur = ∇x f(x_t, y_t), fx_prev = ∇x f(x_{t-1}, y_{t-1}) (same sample),
            jv_cur = ∇xy g·v_t at (x_t, y_t), jv_prev (the previous iterate).
            Contiguous or a row-padded view ``buf[:, :p]``.
        alpha: outer step size α_t (Python float).
        eta_f: momentum weight η^f_t in [0, 1] (1: no momentum).
        fd: must be False (the default). The rows always hold finished products;
            the finite-difference row layout (``fd=True``) was removed and raises
            ValueError. Kept so that callers passing ``fd=False`` keep working.
        scale_cur, scale_prev: ignored (None or a finite real number); the 1/(2δ)
            scales of the removed finite-difference layout.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        (x_new, h_f_new): new 1-D tensors in the storage dtype; inputs unmodified.

    Raises:
        TypeError / ValueError: invalid arguments (the message names them); fd=True.
        RuntimeError: backend="triton" cannot run here.
    """
    C.check_backend(backend)
    C.check_products_layout(fd, scale_cur, scale_prev)
    C.check_state("x", x)
    C.check_like("h_f", h_f, "x", x)
    C.check_grads(grads, OUTER_ROWS, "x", x)
    kw = dict(alpha=C.real("alpha", alpha), eta_f=C.weight("eta_f", eta_f))
    impl = _triton() if _use_triton(backend, x) else reference
    return impl.outer_update(x, h_f, grads, **kw)


def project_ball(w, w_sqnorm, radius, backend="auto"):
    """Project w on the ball of radius r_v: the new LS iterate v (FdeHBO Alg. 1 line 6).

    ``v = w`` if ‖w‖ ≤ r_v else ``r_v·w/‖w‖``, computed as ``w·r_v/max(‖w‖, r_v)``:
    exactly ``w`` inside the ball and finite (zero) at ``w = 0``. The norm is read
    from ``w_sqnorm`` on the device (no host synchronisation).

    Args:
        w: the unprojected iterate, flat contiguous 1-D buffer (storage dtype).
        w_sqnorm: one-element tensor on w's device holding Σ w², e.g. the last
            output of :func:`inner_update`.
        radius: r_v > 0 (Python float); ``math.inf`` returns a copy of w.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        v_new: a new tensor shaped and typed like ``w``; w is not modified.

    Raises:
        TypeError / ValueError: invalid arguments (the message names them).
        RuntimeError: backend="triton" cannot run here.
    """
    C.check_backend(backend)
    C.check_state("w", w)
    C.check_sqnorm(w_sqnorm, w)
    r = C.radius(radius)
    impl = _triton() if _use_triton(backend, w) else reference
    return impl.project_ball(w, w_sqnorm, r)

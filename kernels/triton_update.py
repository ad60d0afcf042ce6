"""Triton kernels for the fused single-loop updates (FdeHBO Alg. 1, FMBO Alg. 2).

Importing this module imports triton; :mod:`torchbilevel.kernels` does so
lazily, only when the Triton path is asked for, so the library works without
triton installed.

One program handles ``BLOCK`` consecutive elements of the flat buffers and
reads every stacked gradient row (gradients and finished products ∇yy g·v,
∇xy g·v) at the same offsets (row ``k`` lives at
``grads_ptr + k·row_stride``), so each side of a step is a single pass over
memory. Arithmetic is float32 whatever the storage dtype (float16, bfloat16,
float32); results are rounded to the storage dtype once, at the store. The
inner kernel also writes one partial Σw² per program, which the wrapper sums on
the device: no host synchronisation anywhere.

Whether the kernels were built for the interpreter (``TRITON_INTERPRET=1`` set
before this module was first imported) is fixed at import; see
:data:`INTERPRETED`. :data:`LAUNCHES` counts kernel launches per entry point so
that tests can prove this path ran.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: elements per program (untuned: no GPU was available when this was written)
BLOCK = 1024
#: warps per program
NUM_WARPS = 4

#: kernel launches made by this module, per public entry point
LAUNCHES = {"inner_update": 0, "outer_update": 0, "project_ball": 0}


@triton.jit
def _inner_kernel(
    y_ptr, v_ptr, hg_ptr, hr_ptr, g_ptr,
    y_out, w_out, hg_out, hr_out, part_ptr,
    n, row_stride,
    beta, lam, keep_g, keep_r,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # successive rows by pointer increments: no row_index·row_stride product to overflow
    r0 = g_ptr + offs
    r1 = r0 + row_stride
    r2 = r1 + row_stride
    r3 = r2 + row_stride
    r4 = r3 + row_stride
    r5 = r4 + row_stride
    gy_cur = tl.load(r0, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    gy_prev = tl.load(r1, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    hv_cur = tl.load(r2, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    hv_prev = tl.load(r3, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    fy_cur = tl.load(r4, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    fy_prev = tl.load(r5, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    r_cur = hv_cur - fy_cur  # eq. (5)/(8): R = ∇yy g·v − ∇y f
    r_prev = hv_prev - fy_prev  # the same at the previous iterate
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h_g = tl.load(hg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h_r = tl.load(hr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hg_new = gy_cur + keep_g * h_g - keep_g * gy_prev  # eq. (6): η a + (1−η)(h + a − b) = a + (1−η)h − (1−η)b
    hr_new = r_cur + keep_r * h_r - keep_r * r_prev  # eq. (7)/(12), same rearrangement
    y_new = y - beta * hg_new  # Alg. 1 line 4: y − β h_g
    w = (v - lam * hr_new).to(w_out.dtype.element_ty)  # Alg. 1 line 5: w = v − λ h_R, as stored
    tl.store(y_out + offs, y_new.to(y_out.dtype.element_ty), mask=mask)
    tl.store(w_out + offs, w, mask=mask)
    tl.store(hg_out + offs, hg_new.to(hg_out.dtype.element_ty), mask=mask)
    tl.store(hr_out + offs, hr_new.to(hr_out.dtype.element_ty), mask=mask)
    wf = tl.where(mask, w.to(tl.float32), 0.0)
    tl.store(part_ptr + pid, tl.sum(wf * wf, axis=0))  # this block's share of ‖w‖² (line 6)


@triton.jit
def _outer_kernel(
    x_ptr, hf_ptr, g_ptr, x_out, hf_out,
    n, row_stride,
    alpha, keep_f,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r0 = g_ptr + offs
    r1 = r0 + row_stride
    r2 = r1 + row_stride
    r3 = r2 + row_stride
    fx_cur = tl.load(r0, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    fx_prev = tl.load(r1, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    jv_cur = tl.load(r2, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    jv_prev = tl.load(r3, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    f_cur = fx_cur - jv_cur  # eq. (3): F = ∇x f − ∇xy g·v
    f_prev = fx_prev - jv_prev  # the same at the previous iterate
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h_f = tl.load(hf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hf_new = f_cur + keep_f * h_f - keep_f * f_prev  # eq. (10)/(13): F_cur + (1−η_f)(h_f − F_prev)
    x_new = x - alpha * hf_new  # Alg. 1 line 7: x − α h_f
    tl.store(x_out + offs, x_new.to(x_out.dtype.element_ty), mask=mask)
    tl.store(hf_out + offs, hf_new.to(hf_out.dtype.element_ty), mask=mask)


@triton.jit
def _project_kernel(w_ptr, sq_ptr, v_out, n, radius, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    norm = tl.sqrt_rn(tl.load(sq_ptr).to(tl.float32))
    # Alg. 1 line 6: v = w·r/max(‖w‖, r), exactly w when ‖w‖ ≤ r and finite at w = 0
    factor = tl.div_rn(radius, tl.maximum(norm, radius))
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(v_out + offs, (w * factor).to(v_out.dtype.element_ty), mask=mask)


#: True when the kernels above were built by the Triton interpreter (CPU tensors work)
INTERPRETED = not isinstance(_inner_kernel, triton.runtime.JITFunction)


def _on_device(t: torch.Tensor):
    """Launch on the tensor's own GPU, not whichever is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def inner_update(y, v, h_g, h_R, grads, *, beta, lam, eta_g, eta_R):
    """Triton version of :func:`torchbilevel.kernels.inner_update` (arguments already validated)."""
    n = y.numel()
    grid = (triton.cdiv(n, BLOCK),)
    y_new, w = torch.empty_like(y), torch.empty_like(v)
    h_g_new, h_R_new = torch.empty_like(h_g), torch.empty_like(h_R)
    partial = torch.empty(grid[0], dtype=torch.float32, device=y.device)
    with _on_device(y):
        _inner_kernel[grid](
            y, v, h_g, h_R, grads, y_new, w, h_g_new, h_R_new, partial,
            n, grads.stride(0),
            beta, lam, 1.0 - eta_g, 1.0 - eta_R,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    LAUNCHES["inner_update"] += 1
    return y_new, w, h_g_new, h_R_new, partial.sum()  # on-device reduction of the partials


def outer_update(x, h_f, grads, *, alpha, eta_f):
    """Triton version of :func:`torchbilevel.kernels.outer_update` (arguments already validated)."""
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    x_new, h_f_new = torch.empty_like(x), torch.empty_like(h_f)
    with _on_device(x):
        _outer_kernel[grid](
            x, h_f, grads, x_new, h_f_new,
            n, grads.stride(0),
            alpha, 1.0 - eta_f,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    LAUNCHES["outer_update"] += 1
    return x_new, h_f_new


def project_ball(w, w_sqnorm, radius):
    """Triton version of :func:`torchbilevel.kernels.project_ball` (arguments already validated)."""
    if radius == float("inf"):
        return w.clone()
    n = w.numel()
    grid = (triton.cdiv(n, BLOCK),)
    v = torch.empty_like(w)
    with _on_device(w):
        _project_kernel[grid](w, w_sqnorm, v, n, radius, BLOCK=BLOCK, num_warps=NUM_WARPS)
    LAUNCHES["project_ball"] += 1
    return v

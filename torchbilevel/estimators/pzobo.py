"""PZOBO / PZOBO-S (Sow, Ji, Liang 2022, Alg. 1, eq. (4)-(5), (7)): the response Jacobian
∂y_N/∂x estimated from the difference of perturbed inner gradient-descent paths.

δ_j = (y_N(x + μ u_j) − y_N(x)) / μ,   u_j ~ N(0, I)                     (eq. (4), Alg. 1 l. 12)
∇̂Φ = ∇x f(x, y_N) + (1/Q) Σ_j ⟨δ_j, ∇y f(x, y_N)⟩ u_j                   (eq. (5) / (7))

No second-order products at all.  With minibatch iterators this is PZOBO-S: every path
follows the same inner batches S_0..S_{N-1}, and f uses an independent outer batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad, vmap

from .. import randomness as R
from .. import sharding as S
from .. import tree as T
from ..derivatives import vmap_unsupported
from ..guards import INNER, PATHS, record
from ..problem import check_features, check_positive, check_steps, draw
from .base import HypergradAux, outer_grads, unroll


DISTRIBUTIONS = ("gaussian", "sphere")


class PZOBO(NamedTuple):
    """PZOBO estimator config (see :func:`pzobo`)."""
    steps: int
    lr: float
    directions: int
    mu: float
    antithetic: bool = False
    generator: Optional[torch.Generator] = None
    vectorize: Optional[bool] = None
    distribution: str = "gaussian"

    # read by features.can_lift: PZOBO perturbs x itself (x + μu), so a hypergradient
    # cannot be lifted through declared features computed once at x
    perturbs_x = True

    def sample_directions(self, x, shards=None):
        """Q directions shaped like x (leading dim Q), from ``generator``: u_j ~ N(0, I)
        ("gaussian", eq. (4)), or each tensor of u_j drawn uniformly on its unit sphere
        ("sphere", the authors' released rule).  ``shards`` (the Specs of a sharded x): the
        directions of one process over the global x, of which this rank keeps its shard (a
        sharded run then equals one process; the draw costs Q x the global size of x)."""
        specs = shards.shards if shards is not None and shards.shards is not None else [None] * len(x)
        shapes = {k: (sp[2] if sp is not None else x[k].shape) for k, sp in zip(x, specs)}
        any_t = next(iter(x.values()))
        numel = sum(math.prod(sh) for sh in shapes.values())
        dev = self.generator.device if self.generator is not None else any_t.device
        flat = torch.randn(self.directions, numel, generator=self.generator, device=dev, dtype=any_t.dtype)
        flat = flat.to(any_t.device)
        u, pos = {}, 0
        for (k, sh), sp in zip(shapes.items(), specs):
            t = flat[:, pos:pos + math.prod(sh)].view(self.directions, *sh)
            pos += math.prod(sh)
            if self.distribution == "sphere":
                t = t / torch.linalg.vector_norm(t.reshape(self.directions, -1), dim=1).clamp_min(
                    torch.finfo(t.dtype).tiny).reshape((-1,) + (1,) * (t.dim() - 1))
            u[k] = S.local_part(sp, t)
        return u

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        batches = [draw(inner_batch, "inner_batch") for _ in range(self.steps)]   # one path of batches
        ob = draw(outer_batch, "outer_batch")                                     # independent outer batch D_F
        path = lambda xx: unroll(problem, xx, y, batches, self.lr, differentiable=False)
        # common random numbers: every path replays the unperturbed path's random stream
        # step by step (same batches AND same dropout masks, eq. (4)-(5))
        start = R.capture(x, y)
        y_n = path(x)                                               # Alg. 1 lines 4-6
        record(INNER, y_n)
        fx, fy, fval = outer_grads(problem, x, y_n, ob)             # fresh randomness: D_F
        sx, sy = problem.shards if problem.shards is not None else (None, None)
        u = self.sample_directions(x) if sx is None else self.sample_directions(x, sx)   # Alg. 1 line 8
        after = R.capture(x, y)
        if self.antithetic:
            # Central difference over ±μu: (y_N(x+μu) − y_N(x−μu)) / 2μ, same expectation.
            both = {k: torch.cat([t, -t]) for k, t in u.items()}
            ys = self._paths(path, x, both, problem, y, batches, start)
            q = self.directions
            delta = {k: (t[:q] - t[q:]) / (2 * self.mu) for k, t in ys.items()}
        else:
            ys = self._paths(path, x, u, problem, y, batches, start)   # Alg. 1 lines 9-11
            delta = {k: (t - y_n[k]) / self.mu for k, t in ys.items()}   # line 12
        R.restore(after)                     # the paths' replays consume nothing more
        record(PATHS, ys)
        # ⟨δ_j, ∇y f⟩ for each direction j
        parts = {k: (delta[k].reshape(self.directions, -1) * fy[k].reshape(1, -1)).sum(1) for k in fy}
        coef = sum(parts.values()) if sy is None else S.sum_over_ranks(parts, sy)   # sharded y: over ranks
        jt_fy = {k: torch.tensordot(coef, t, dims=1) / self.directions for k, t in u.items()}
        dx = T.add(fx, jt_fy)                                        # eq. (5) / (7)
        return dx, HypergradAux({k: t.detach() for k, t in y_n.items()}, None, fval.detach())

    def _paths(self, path, x, u, problem, y, batches, start):
        """y_N(x + μ u_j) for every direction j (leading dim), each path replaying the random
        stream ``start`` of the unperturbed path."""
        shifted = lambda uj: {k: x[k] + self.mu * uj[k] for k in x}
        data_parallel = problem.reduce is not None or problem.shards is not None   # collectives inside
        n = next(iter(u.values())).shape[0]
        if problem.features is not None and not data_parallel and all(b is batches[0] for b in batches):
            return self._head_paths(problem, shifted, u, n, y, batches[0], start)
        vectorize = self.vectorize if self.vectorize is not None else next(iter(x.values())).is_cuda
        vectorize = vectorize and not data_parallel      # collectives cannot run under vmap
        if vectorize:
            R.restore(start)
            try:     # randomness="same": one draw per step, shared by all directions
                return vmap(lambda uj: path(shifted(uj)), randomness=R.VMAP_RANDOMNESS)(u)
            except (RuntimeError, NotImplementedError) as err:
                if self.vectorize or not vmap_unsupported(err):
                    raise
                # default vectorize on CUDA, a module vmap cannot batch (e.g. nn.LSTM): loop
        outs = []
        for j in range(n):
            R.restore(start)
            outs.append(path(shifted({k: t[j] for k, t in u.items()})))
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}

    def _head_paths(self, problem, shifted, u, n, y, batch, start):
        # Declared features, one batch for the whole path: phi(x + μu_j, S) once per
        # direction (a loop: on CPU vmap over per-direction conv weights was 8x slower),
        # then the N head-only steps of all directions in one vmap over z_j (measured on
        # LeNet HR: N·Q separate head gradients cost about as much as 5 body forwards).
        # Random streams as in the unperturbed path: phi's draws, then the steps' draws.
        zs = []
        for j in range(n):
            R.restore(start)
            with torch.no_grad():
                zs.append(check_features(problem.features(shifted({k: t[j] for k, t in u.items()}), batch)))
        after_phi = R.capture(y)
        stacked = (torch.stack(zs) if isinstance(zs[0], Tensor) else
                   {k: torch.stack([z[k] for z in zs]) for k in zs[0]})

        def head_path(z):
            yy = y
            for _ in range(self.steps):
                gy = grad(lambda yv: problem.head_inner(z, yv, batch))(yy)
                yy = {k: yy[k] - self.lr * gy[k] for k in yy}
            return yy
        R.restore(after_phi)
        return vmap(head_path, randomness=R.VMAP_RANDOMNESS)(stacked)


def pzobo(steps: int, lr: float, directions: int, mu: float, *, antithetic: bool = False,
          generator: Optional[torch.Generator] = None, vectorize: Optional[bool] = None,
          distribution: str = "gaussian") -> PZOBO:
    """PZOBO hypergradient (Sow, Ji, Liang, NeurIPS 2022, Alg. 1, eq. (4)-(5); PZOBO-S with
    iterator batches, eq. (7)): Hessian-free, ``steps`` inner GD steps of size ``lr`` from
    the given y, plus one perturbed path per Gaussian direction; the response Jacobian
    is estimated from the difference of the paths.  Cost: (Q+1)·N y-gradients of g and
    one gradient of f, no second-order products (measured 42 gradient evaluations of g for
    N = Q = 10 on LeNet, 16x AID-CG(10), bench/RESULTS.md).

    Args:
        steps: N, inner gradient steps per path.
        lr: α, inner step size.
        directions: Q, number of Gaussian directions u_j.
        mu: μ > 0, the perturbation size of x.
        antithetic: use ±μu pairs and a central difference (2Q perturbed paths instead of
            Q + 1).  Not in the paper.  It cancels the O(μ) curvature term, not the
            sampling variance of u·uᵀ: measured (bench/RESULTS.md §3) no gain at small μ,
            32% lower error at μ = 0.3 for the same Q, worse at the same number of paths.
            Keep μ small and spend paths on directions unless μ must be large.
        generator: a ``torch.Generator`` for the directions (reproducible runs; saved by
            ``double_loop``'s ``state_dict``).  Data parallel: seed it identically on
            every rank, so that all ranks use the same directions.
        vectorize: run the Q perturbed paths in one ``torch.func.vmap`` call (True) or a
            Python loop (False); default: vmap on CUDA, loop on CPU (on CPU, vmap over
            per-direction conv weights was measured 8x slower than the loop, bench/RESULTS.md).
            The default falls back to the loop for modules vmap cannot batch (nn.LSTM).
        distribution: ``"gaussian"`` (default): u_j ~ N(0, I), eq. (4)-(5) of the paper, an
            estimator whose mean is the ITD hypergradient of the same path (E[u uᵀ] = I).
            ``"sphere"``: the rule of the authors' released code — each tensor of u_j drawn
            uniformly on its own unit sphere, with no dimension factor.  Then
            E[u uᵀ] = diag(I/p_k) block by block (p_k: the size of x's k-th tensor), so its
            mean is ∇x f + (1/p_k)·(implicit term) on each tensor: a biased estimator that,
            for a large x (a network body), is in effect the partial gradient ∇x f
            (:func:`first_order`).  Offered to reproduce the papers' figures, which used it.

    Random streams: all Q + 1 paths see the same inner batches and, step by step, the same
    dropout masks (the generator state is replayed for each path; ``randomness="same"``
    under vmap), so δ_j measures the response to x, not mask noise.

    In expectation over u the estimate equals the ITD hypergradient of the same inner
    path (eq. (4): E[u uᵀ] = I), up to O(μ) curvature terms.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return PZOBO(check_steps(steps, "steps"), check_positive(lr, "lr"),
                 check_steps(directions, "directions"), check_positive(mu, "mu"),
                 bool(antithetic), generator, None if vectorize is None else bool(vectorize), distribution)

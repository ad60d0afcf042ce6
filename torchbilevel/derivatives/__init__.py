"""Derivatives of the bilevel objectives, one idea per module:

* :mod:`.gradient` — ``gradient``: (value, gradients) by autograd or torch.func, the base of
  everything else;
* :mod:`.exact` — exact products ∇yy g·v and ∇xy g·v (linearizations reused by the solvers,
  FMBO's one-backward pair);
* :mod:`.finite_difference` — finite-difference products (FdeHBO eq. (9), (11)), the step δ
  and the pair policy;
* :mod:`.gauss_newton` — generalized Gauss-Newton products for a declared loss of outputs;
* :mod:`.second_order` — the guard for objectives without a double backward.

``torchbilevel.derivatives.X`` names every public function of the four.
"""
from .exact import (Linearization, averaged, exact_products, grad_y, grads, hvp, hvp_and_mixed, linearize,
                    mixed)
from .finite_difference import (PAIR_FLOP_RATIO, FDProducts, choose_pair_batched, fd_delta, fd_delta_from_norms,
                                fd_products, pair_flop_ratio, vmap_unsupported)
from .gauss_newton import gauss_newton_linearize
from .gradient import gradient
from .second_order import cudnn_rnns_seen, second_order

__all__ = ["Linearization", "linearize", "averaged", "grad_y", "grads", "hvp", "mixed", "hvp_and_mixed",
           "fd_delta", "fd_delta_from_norms", "FDProducts", "fd_products", "vmap_unsupported", "second_order",
           "pair_flop_ratio", "choose_pair_batched", "PAIR_FLOP_RATIO", "gradient", "exact_products",
           "cudnn_rnns_seen", "gauss_newton_linearize"]

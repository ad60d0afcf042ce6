"""Experiments from the papers, as library code.

Each experiment is a module with a config dataclass and ``run(config,
progress=None) -> list[dict]``: a tidy record, one row per (method,
evaluation) with ``method``, ``step``, ``seconds`` (optimisation time only)
and the experiment's metrics.

* ``hyperclean``: data hyper-cleaning on MNIST-5k (stocBiO paper app. A.2, FdeHBO paper §4.2)
* ``shallow_hr``: shallow hyper-representation, synthetic (Hessian-free paper §4.1)
* ``deep_hr``: deep hyper-representation, LeNet on MNIST-5k (FdeHBO §4.1, Hessian-free §4.2)
* ``weight_decay``: per-feature weight decay, logistic regression (stocBiO paper app. A.2)
* ``compare``: every stochastic method on a finite-sum quadratic, equal gradient evaluations and equal time
* ``lm_reweight``: domain weights of a small transformer's training mixture (ScaleBiO, Pan et al. 2025)
* ``fewshot``: few-shot meta-learning, CNN4 on rotated MNIST-5k digits (stocBiO §5, Hessian-free §4.3)

``python -m torchbilevel demo`` / ``python -m torchbilevel run NAME`` run them.
"""
from . import compare, deep_hr, fewshot, hyperclean, lm_reweight, shallow_hr, weight_decay

__all__ = ["EXPERIMENTS", "compare", "deep_hr", "fewshot", "hyperclean", "lm_reweight", "shallow_hr", "weight_decay"]

# name -> (module, config class); every module has run(config, progress=None)
EXPERIMENTS = {
    "hyperclean": (hyperclean, hyperclean.HypercleanConfig),
    "shallow_hr": (shallow_hr, shallow_hr.ShallowHRConfig),
    "deep_hr": (deep_hr, deep_hr.DeepHRConfig),
    "weight_decay": (weight_decay, weight_decay.WeightDecayConfig),
    "compare": (compare, compare.CompareConfig),
    "lm_reweight": (lm_reweight, lm_reweight.LMReweightConfig),
    "fewshot": (fewshot, fewshot.FewShotConfig),
}

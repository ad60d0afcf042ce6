"""Data reweighting for language-model training: ScaleBiO's application in miniature.

Pan et al., "ScaleBiO: Scalable Bilevel Optimization for LLM Data Reweighting", ACL 2025
(§3, eq. (1)): learn the weights of a mixture of training domains so that the model
trained on the mixture does well on clean held-out text. Here the model is a small causal
transformer (:class:`~torchbilevel.experiments.transformer.TinyGPT`, SDPA attention, tied
embedding and head, about 1M parameters) on byte tokens, and the domains ship with Python
(:mod:`torchbilevel.text`): English documentation (``docs``), standard-library source
(``code``), and two corrupted domains, the documentation's words shuffled (``shuffled``)
and random characters (``random``). With x = domain-weight logits and y = every
parameter of the model,

    inner  g(x, y) = Σ_d softmax(x)_d · mean LM loss of y on a batch of domain d   (ScaleBiO eq. (1), lower level)
    outer  f(x, y) = mean LM loss of y on held-out documentation                   (ScaleBiO eq. (1), upper level)

f never trains the model: its text (every 5th documentation topic) is in no domain.
Methods (gradient-only, as ScaleBiO's): FdeHBO, the first-order estimator ∇x f in a double
loop, F2SA and BOME. f does not depend on x directly, so ∇x f = 0 and the first-order
row never moves the weights: it is the uniform mixture, run by the bilevel code path.
Baselines train the same model with the weights frozen at uniform and at the clean domains
only (docs and code, equal weights). Every row starts from the same model and draws its
own seeded batches; y is trained by plain SGD steps of size ``lr_y`` in every row.

``shard=True`` (``torchrun --nproc-per-node 2 -m torchbilevel run lm_reweight --shard``)
shards the model with FSDP2 (``fully_shard`` on every block, then the root) before
``tb.nn.split`` and wraps the problem with ``tb.distributed.data_parallel``: each rank
draws the same full batches and keeps its 1/N slice of every one, so the run computes
the one-process full-batch steps (objectives are means).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import torch

import torchbilevel as tb

from .. import text
from .methods import check_names
from .runner import Method, run_methods
from .transformer import TinyGPT, token_losses

__all__ = ["LMReweightConfig", "LABELS", "METHODS", "WEIGHT_COLUMNS", "make_model", "model_parameters",
           "domain_losses", "inner_loss", "outer_loss", "make_problem", "make_methods", "evaluate",
           "init_shard", "shard_model", "CallIgnoresParameters", "check_call_sees_parameters", "run"]

LABELS = {"fdehbo": "FdeHBO", "first_order": "first-order", "f2sa": "F2SA", "bome": "BOME",
          "uniform": "uniform weights", "clean": "clean domains only"}
METHODS = tuple(LABELS)
#: record column of each domain's weight softmax(x)_d
WEIGHT_COLUMNS = tuple(f"w_{d}" for d in text.DOMAINS)
_FROZEN = ("uniform", "clean")


@dataclasses.dataclass
class LMReweightConfig:
    """Settings of one run (defaults: about 5 min on 2 shared CPU cores, one process).

    Model: :class:`TinyGPT` with ``d_model``, ``layers``, ``heads`` over windows of
    ``context`` bytes (the defaults give 1.03M parameters). Data: ``n_bytes`` tokens per
    domain; every step of g sees ``batch_size`` windows of each domain, f
    ``val_batch`` held-out windows; the metric ``val_loss`` is the mean loss over
    ``eval_windows`` fixed held-out windows. Each row runs at most ``steps`` steps and
    ``seconds`` of optimisation time (None: no limit). y steps: ``lr_y`` (SGD, every row);
    x steps: ``lr_x``. FdeHBO: momentum weights ``eta``, linear-system step ``lr_y``, ball
    ``radius``; F2SA: ``penalty`` λ_0 and ``f2sa_inner_steps`` T (default 1: one inner step
    per outer step like the other rows; Algorithm 1's T = 10 costs 3T + 3 = 33 gradients
    per step, and on the tiny model at 15 outer steps, seed 0, it left the random-characters
    weight at 0.55 where T = 1 and 3 cut it to 0.06 and 0.08); BOME: ``bome_inner_steps``.
    ``shard``: FSDP2 over the torchrun process group (see the module docstring); with
    ``fsdp=False`` the ranks keep whole replicas of the model and only the batches are
    split (the library's data parallelism alone: a check of everything but the sharding).
    """

    methods: Sequence[str] = METHODS
    n_bytes: int = 200_000
    context: int = 32
    batch_size: int = 4
    val_batch: int = 8
    eval_windows: int = 64
    d_model: int = 128
    layers: int = 5
    heads: int = 4
    steps: int = 2000
    seconds: float | None = 45.0
    eval_every: int = 10
    eval_seconds: float | None = 3.0
    lr_y: float = 2.0
    lr_x: float = 0.5
    eta: float = 0.5
    radius: float = 10.0
    penalty: float = 10.0
    f2sa_inner_steps: int = 1
    bome_inner_steps: int = 3
    seed: int = 0
    device: str = "cpu"
    shard: bool = False
    fsdp: bool = True


def make_model(cfg: LMReweightConfig) -> TinyGPT:
    """The seeded model of the config, on its device."""
    torch.manual_seed(cfg.seed)
    return TinyGPT(text.VOCAB, cfg.d_model, cfg.layers, cfg.heads, cfg.context).to(cfg.device)


def model_parameters(model: torch.nn.Module) -> dict:
    """y: every parameter of ``model`` (``tb.nn.split`` with every parameter inner: x, the
    domain logits, lives outside the module; tied tensors once)."""
    _, y = tb.nn.split(model, inner=lambda name, p: True)
    return y


def domain_losses(model: torch.nn.Module, y: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of the model at y on each domain: ``tokens`` (D, B, T+1) -> (D,)."""
    d, b, t1 = tokens.shape
    flat = tokens.reshape(d * b, t1)
    logits = tb.nn.call(model, {}, y, flat[:, :-1])
    return token_losses(logits, flat[:, 1:]).reshape(d, b * (t1 - 1)).mean(1)


def inner_loss(model: torch.nn.Module) -> Callable:
    """g(x, y, tokens) = Σ_d softmax(x)_d · mean loss on domain d   (ScaleBiO eq. (1), lower level)."""

    def g(x, y, tokens):
        return (torch.softmax(x["logits"], 0) * domain_losses(model, y, tokens)).sum()

    return g


def outer_loss(model: torch.nn.Module) -> Callable:
    """f(x, y, tokens) = mean loss on held-out windows (B, T+1)   (ScaleBiO eq. (1), upper level)."""

    def f(x, y, tokens):
        return token_losses(tb.nn.call(model, {}, y, tokens[:, :-1]), tokens[:, 1:]).mean()

    return f


def make_problem(model: torch.nn.Module, shard: bool = False) -> tb.Bilevel:
    """The bilevel problem; with ``shard`` wrapped by ``tb.distributed.data_parallel``."""
    problem = tb.Bilevel(outer=outer_loss(model), inner=inner_loss(model))
    return tb.distributed.data_parallel(problem) if shard else problem


def _build(key: str, problem, cfg: LMReweightConfig):
    c = cfg
    if key == "fdehbo":
        return tb.fdehbo(problem, lr_x=c.lr_x, lr_y=c.lr_y, lr_v=c.lr_y, eta_x=c.eta, eta_y=c.eta,
                         eta_v=c.eta, radius=c.radius, batched=False)
    if key == "f2sa":
        return tb.f2sa(problem, lr_x=c.lr_x, lr_y=c.lr_y, lr_z=c.lr_y, penalty=c.penalty,
                       inner_steps=c.f2sa_inner_steps)
    if key == "bome":
        return tb.bome(problem, lr_x=c.lr_x, lr_y=c.lr_y, inner_steps=c.bome_inner_steps)
    # first-order, and the frozen baselines: ∇x f = 0 here, so x never moves and the
    # double loop is SGD on g at the given weights (one f gradient per step besides)
    return tb.double_loop(problem, tb.first_order(), lr_x=c.lr_x, inner_steps=1, lr_y=c.lr_y,
                          outer="sgd")


def _rank_slice(stream, dim: int, shard: bool):
    """This rank's 1/N of every batch of ``stream`` along ``dim`` (the whole batch unsharded)."""
    if not shard:
        yield from stream
        return
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    for batch in stream:
        n = batch.shape[dim] // world
        yield batch.narrow(dim, rank * n, n)


def _streams(cfg: LMReweightConfig, data: text.TextDomains, k: int):
    dev = torch.device(cfg.device)
    inner = text.window_stream(data.train, cfg.batch_size, cfg.context, cfg.seed + 100 + k)
    outer = (b[0] for b in text.window_stream([data.val], cfg.val_batch, cfg.context,
                                                cfg.seed + 200 + k))
    inner = (b.to(dev) for b in _rank_slice(inner, 1, cfg.shard))
    outer = (b.to(dev) for b in _rank_slice(outer, 0, cfg.shard))
    return inner, outer


def initial_logits(key: str, cfg: LMReweightConfig) -> torch.Tensor:
    """x0 of a row: zeros (uniform), or for ``clean`` −1e9 on the corrupted domains
    (softmax weight exactly 0) and 0 on the others."""
    x = torch.zeros(len(text.DOMAINS), device=cfg.device)
    if key == "clean":
        for i, name in enumerate(text.DOMAINS):
            if name in text.CORRUPTED:
                x[i] = -1e9
    return x


def make_methods(cfg: LMReweightConfig, data: text.TextDomains, problem) -> list[Method]:
    """The configured rows, each with its own seeded batch streams."""
    check_names(cfg.methods, METHODS)
    for name in ("batch_size", "val_batch"):
        value = getattr(cfg, name)
        if cfg.shard and value % _world() != 0:
            raise ValueError(f"{name}={value} must be a multiple of the number of ranks ({_world()}): "
                             "each rank holds 1/N of every batch")
    out = []
    for k, key in enumerate(cfg.methods):
        inner, outer = _streams(cfg, data, k)
        out.append(Method(LABELS[key], _build(key, problem, cfg), inner, outer, cfg.steps,
                          cfg.eval_every, cfg.eval_seconds))
    return out


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def evaluate(cfg: LMReweightConfig, data: text.TextDomains, model: torch.nn.Module) -> Callable:
    """Metrics of (x, y): ``val_loss`` (nats per byte on ``eval_windows`` fixed held-out
    windows, spread evenly over the held-out text), each domain's weight ``w_<domain>`` and
    ``w_corrupted``, the total weight of the corrupted domains."""
    n = data.val.numel() - cfg.context - 1
    starts = torch.linspace(0, n - 1, cfg.eval_windows).long()
    windows = text.windows(data.val, starts, cfg.context).to(cfg.device)
    f = outer_loss(model)

    def metrics_of(x: dict, y: dict) -> dict:
        out = {"val_loss": float(f(x, y, windows))}
        weights = torch.softmax(x["logits"].detach().float(), 0).tolist()
        out.update(zip(WEIGHT_COLUMNS, weights))
        out["w_corrupted"] = sum(w for d, w in zip(text.DOMAINS, weights) if d in text.CORRUPTED)
        return out

    return metrics_of


def init_shard(device: str = "cpu") -> None:
    """Join the torchrun process group (gloo for a CPU ``device``, nccl for CUDA) unless
    already joined. Raises RuntimeError, saying how to launch, when not started by torchrun."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError("shard=True (--shard) runs under torchrun, one process per rank: "
                           "torchrun --nproc-per-node 2 -m torchbilevel run lm_reweight --shard")
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` on every transformer block, then on the root (embedding,
    positions, final LayerNorm and the tied head stay together in the root group)."""
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


class CallIgnoresParameters(RuntimeError):
    """``tb.nn.call`` cannot evaluate this model at the parameters it is given."""


def check_call_sees_parameters(model: torch.nn.Module, y: dict, tokens: torch.Tensor) -> None:
    """Raise :class:`CallIgnoresParameters` unless ``tb.nn.call(model, {}, y, ·)`` runs and
    depends on ``y``: the model at y and at y = 0 must give different logits. A wrapper that
    evaluates its own parameters (FSDP2 before torchbilevel supports it) would make every
    hypergradient 0; one that cannot take the given tensors fails here, before any work."""
    sharded = " FSDP2-sharded" if _world() > 1 else ""
    advice = ("Run without --shard, or with a torchbilevel whose tb.nn.call evaluates "
              "fully_shard'ed modules at the x and y it is given (issue 16, item 1).")
    try:
        with torch.no_grad():
            at_y = tb.nn.call(model, {}, y, tokens)
            at_zero = tb.nn.call(model, {}, {k: torch.zeros_like(v) for k, v in y.items()}, tokens)
            same = bool(torch.equal(_local(at_y), _local(at_zero)))
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise CallIgnoresParameters(
            f"tb.nn.call could not evaluate the{sharded} model at the parameters it was given "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). {advice}") from err
    if same:
        raise CallIgnoresParameters(
            "tb.nn.call evaluated the model's own parameters, not the y it was given (the "
            f"logits at y and at y = 0 are equal): this torchbilevel cannot evaluate this{sharded} "
            f"model functionally, and every hypergradient would be 0. {advice}")


def _local(t):
    """The local tensor of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def run(cfg: LMReweightConfig, progress=None) -> list[dict]:
    """Run every configured row; rows of (method, step, seconds, val_loss, w_<domain>...)."""
    check_names(cfg.methods, METHODS)
    if cfg.shard:
        init_shard(cfg.device)
    data = text.build_domains(cfg.n_bytes, seed=cfg.seed)
    model = make_model(cfg)
    if cfg.shard and cfg.fsdp:
        shard_model(model)
    y0 = model_parameters(model)
    check_call_sees_parameters(model, y0, data.val[None, :cfg.context].to(cfg.device))
    problem = make_problem(model, cfg.shard)
    record = []
    evaluate_fn = evaluate(cfg, data, model)
    for method, key in zip(make_methods(cfg, data, problem), cfg.methods):
        x0 = {"logits": initial_logits(key, cfg)}
        record += run_methods([method], x0, y0, evaluate_fn, cfg.seconds, progress, cfg.device)
    return record

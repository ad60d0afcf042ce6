"""Evaluation metrics for the experiments: accuracy, cross-entropy, rank AUC."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "cross_entropy", "auc"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of ``logits`` against integer ``labels``, as a float."""
    return F.cross_entropy(logits, labels).item()


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean mask ``positive``.

    Rank form (Mann-Whitney U): the probability that a random positive scores
    higher than a random negative, ties counted one half (tied scores get
    their average rank). Returns NaN when either class is empty.
    """
    scores = scores.detach().double().flatten().cpu()
    positive = positive.detach().bool().flatten().cpu()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

"""Metric-learning losses for global descriptors (pure functions of embedding tensors).

- :func:`npair_loss` — multi-class N-pair loss (Sohn, NIPS 2016), in the exact form of the
  reference implementation (``tf.contrib.losses.metric_learning.npairs_loss``): softmax
  cross-entropy over anchor·positive similarities plus an L2 penalty on the *unnormalised*
  embeddings.
- :func:`triplet_loss` — ranking loss of Gordo et al. (DIR, IJCV 2017) on squared distances.
- :func:`contrastive_loss` — contrastive loss over (query, positive, negatives...) tuples, as in
  cirtorch (Radenović et al., TPAMI 2018).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tuple labels for :func:`contrastive_loss`, as in cirtorch.
QUERY, POSITIVE, NEGATIVE = -1, 1, 0


def npair_loss(anchors: torch.Tensor, positives: torch.Tensor, l2_reg: float = 0.002) -> torch.Tensor:
    """Multi-class N-pair loss with its L2 embedding regulariser.

    ``anchors[i]`` and ``positives[i]`` show class ``i``; every other ``positives[j]`` is a
    negative for ``anchors[i]``. With ``S = anchors @ positives.T`` (N, N)::

        loss = mean_i( -log softmax(S[i])[i] )
               + 0.25 * l2_reg * ( mean_i |anchors[i]|^2 + mean_i |positives[i]|^2 )

    which is exactly ``npairs_loss`` of the paper's TensorFlow code (the 0.25 factor included).
    The embeddings must *not* be L2-normalised (the regulariser would then be a constant).

    Parameters
    ----------
    anchors : Tensor ``(N, D)``
        One embedding per class, ``N >= 2`` distinct classes.
    positives : Tensor ``(N, D)``
        A second embedding of each class, in the same order.
    l2_reg : float
        Weight of the L2 penalty (``reg_lambda``; 0.002 in the paper).

    Returns
    -------
    Tensor ``()``
        Scalar loss.
    """
    if anchors.ndim != 2 or anchors.shape != positives.shape:
        raise ValueError(
            f"anchors and positives must both be (N, D); got {tuple(anchors.shape)} and "
            f"{tuple(positives.shape)}"
        )
    n = anchors.shape[0]
    if n < 2:
        raise ValueError(f"npair_loss needs N >= 2 pairs, got {n}")
    logits = anchors @ positives.T
    xent = F.cross_entropy(logits, torch.arange(n, device=anchors.device))
    reg = anchors.pow(2).sum(1).mean() + positives.pow(2).sum(1).mean()
    return xent + 0.25 * l2_reg * reg


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.1
) -> torch.Tensor:
    """Triplet ranking loss ``mean_i max(0, m + |a_i - p_i|^2 - |a_i - n_i|^2)`` (DIR).

    Parameters
    ----------
    anchor, positive, negative : Tensor ``(N, D)``
        Row ``i`` of each forms triplet ``i`` (L2-normalised descriptors in DIR, where the
        squared distances lie in ``[0, 4]``).
    margin : float
        ``m`` (0.1 in DIR).

    Returns
    -------
    Tensor ``()``
        Mean hinge over the ``N`` triplets.
    """
    if anchor.ndim != 2 or not (anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            "anchor, positive and negative must all be (N, D); got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    d_pos = (anchor - positive).pow(2).sum(1)
    d_neg = (anchor - negative).pow(2).sum(1)
    return F.relu(margin + d_pos - d_neg).mean()


def contrastive_loss(
    x: torch.Tensor, label: torch.Tensor, margin: float = 0.7, eps: float = 1e-6
) -> torch.Tensor:
    """Contrastive loss over tuples, exactly as cirtorch's ``contrastive_loss``.

    ``x`` stacks ``T`` tuples of equal size ``S``: a query (label :data:`QUERY` = -1) followed by
    ``S - 1`` images labelled :data:`POSITIVE` (1) or :data:`NEGATIVE` (0). Each non-query image
    is paired with its tuple's query, ``d = |q - x + eps|`` (the ``eps`` keeps the gradient
    finite at ``d = 0``), and::

        loss = sum_pairs( 0.5 * y * d^2 + 0.5 * (1 - y) * max(0, margin - d)^2 )

    summed (not averaged) over the ``T (S - 1)`` pairs, as cirtorch does.

    Parameters
    ----------
    x : Tensor ``(M, D)``
        Descriptors (L2-normalised in cirtorch), ``M = T * S`` rows, tuple by tuple.
    label : Tensor ``(M,)``
        Integer labels in {-1, 1, 0}; ``label[k * S] == -1`` for every tuple ``k`` and nowhere else.
    margin : float
        Negatives closer than ``margin`` are penalised (0.7 in cirtorch for GeM).
    eps : float
        Added to the difference before the norm.

    Returns
    -------
    Tensor ``()``
        Scalar loss.
    """
    if x.ndim != 2 or label.ndim != 1 or label.shape[0] != x.shape[0]:
        raise ValueError(
            f"x must be (M, D) and label (M,); got {tuple(x.shape)} and {tuple(label.shape)}"
        )
    is_query = label == QUERY
    n_tuples = int(is_query.sum())
    if n_tuples == 0 or x.shape[0] % n_tuples != 0:
        raise ValueError(f"{x.shape[0]} rows cannot be split into {n_tuples} equal tuples")
    size = x.shape[0] // n_tuples
    if size < 2 or not bool(is_query[::size].all()):
        raise ValueError(f"each tuple of {size} rows must start with its query (label {QUERY})")
    if not bool(((label == POSITIVE) | (label == NEGATIVE) | is_query).all()):
        raise ValueError(f"labels must be in {{{QUERY}, {POSITIVE}, {NEGATIVE}}}")
    tuples = x.reshape(n_tuples, size, x.shape[1])
    y = label.reshape(n_tuples, size)[:, 1:].to(x.dtype)
    d = (tuples[:, :1] - tuples[:, 1:] + eps).pow(2).sum(2).sqrt()
    loss = 0.5 * y * d.pow(2) + 0.5 * (1 - y) * torch.clamp(margin - d, min=0).pow(2)
    return loss.sum()

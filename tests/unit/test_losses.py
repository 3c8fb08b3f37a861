"""Losses against hand-computed values, hand-derived gradients and float64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from services.training.losses import contrastive_loss, npair_loss, triplet_loss


def _t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


# -- N-pair ---------------------------------------------------------------------------------


def test_npair_value_by_hand() -> None:
    a = _t([[2.0, 0.0], [0.0, 1.0]])
    p = _t([[1.0, 1.0], [0.0, 2.0]])
    # S = a p^T = [[2, 0], [1, 2]]; targets on the diagonal.
    xent = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    # mean |a|^2 = (4 + 1) / 2, mean |p|^2 = (2 + 4) / 2
    reg = 0.25 * 0.002 * (2.5 + 3.0)
    assert npair_loss(a, p).item() == pytest.approx(xent + reg, abs=1e-12)
    assert npair_loss(a, p, l2_reg=0.0).item() == pytest.approx(xent, abs=1e-12)


def test_npair_gradient_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    p = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    lam = 0.3
    npair_loss(a, p, l2_reg=lam).backward()
    n = a.shape[0]
    with torch.no_grad():
        err = torch.softmax(a @ p.T, dim=1) - torch.eye(n, dtype=torch.float64)
        grad_a = err @ p / n + 0.5 * lam * a / n
        grad_p = err.T @ a / n + 0.5 * lam * p / n
    torch.testing.assert_close(a.grad, grad_a)
    torch.testing.assert_close(p.grad, grad_p)


def test_npair_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    p = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: npair_loss(x, y, l2_reg=0.1), (a, p))


def test_npair_is_invariant_to_class_order() -> None:
    g = torch.Generator().manual_seed(2)
    a, p = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(npair_loss(a, p), npair_loss(a[perm], p[perm]))


def test_npair_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        npair_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        npair_loss(torch.zeros(1, 4), torch.zeros(1, 4))


# -- triplet --------------------------------------------------------------------------------


def test_triplet_value_and_gradient_by_hand() -> None:
    a = _t([[1.0, 0.0], [1.0, 0.0]], grad=True)
    p = _t([[0.8, 0.6], [0.0, 1.0]], grad=True)
    n = _t([[0.0, 1.0], [0.6, 0.8]], grad=True)
    # triplet 0: 0.1 + 0.4 - 2.0 < 0 -> 0; triplet 1: 0.1 + 2.0 - 0.8 = 1.3
    loss = triplet_loss(a, p, n, margin=0.1)
    assert loss.item() == pytest.approx(1.3 / 2, abs=1e-12)
    loss.backward()
    zero = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(a.grad[0], zero)
    torch.testing.assert_close(p.grad[0], zero)
    torch.testing.assert_close(n.grad[0], zero)
    # active: d/da = 2 (n - p) / N, d/dp = -2 (a - p) / N, d/dn = 2 (a - n) / N
    torch.testing.assert_close(a.grad[1], (n[1] - p[1]).detach())
    torch.testing.assert_close(p.grad[1], -(a[1] - p[1]).detach())
    torch.testing.assert_close(n.grad[1], (a[1] - n[1]).detach())


def test_triplet_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    d = (a - p).pow(2).sum(1) - (a - n).pow(2).sum(1)
    margin = 0.5
    assert ((margin + d).abs() > 1e-3).all(), "test data must stay away from the hinge"
    assert ((margin + d) > 0).any() and ((margin + d) < 0).any(), "want both hinge branches"
    assert torch.autograd.gradcheck(lambda x, y, z: triplet_loss(x, y, z, margin), (a, p, n))


# -- contrastive ----------------------------------------------------------------------------


def test_contrastive_value_by_hand() -> None:
    s = math.sqrt(0.19)
    x = _t(
        [
            [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.9, s],  # query, positive, 2 negatives
            [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0],  # query, positive, 2 negatives
        ]
    )
    label = torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0])
    # tuple 0: positive d^2 = 0.8; negative d = sqrt(2) > 0.7; negative d = sqrt(0.2) < 0.7
    # tuple 1: positive d = 0; negative d = sqrt(2); negative d = 0 -> 0.5 * 0.7^2
    expected = 0.5 * 0.8 + 0.5 * (0.7 - math.sqrt(0.2)) ** 2 + 0.5 * 0.7**2
    assert contrastive_loss(x, label, margin=0.7, eps=0.0).item() == pytest.approx(expected, abs=1e-12)


def test_contrastive_gradient_by_hand() -> None:
    x = _t([[1.0, 0.0], [0.6, 0.8], [0.9, math.sqrt(0.19)]], grad=True)
    label = torch.tensor([-1, 1, 0])
    contrastive_loss(x, label, margin=0.7, eps=0.0).backward()
    q, pos, neg = x.detach()
    d = torch.linalg.norm(q - neg)
    # positive: 0.5 |q - x|^2; negative: 0.5 (m - |q - x|)^2
    g_pos_q, g_neg_q = q - pos, -(0.7 - d) * (q - neg) / d
    torch.testing.assert_close(x.grad[0], g_pos_q + g_neg_q)
    torch.testing.assert_close(x.grad[1], -g_pos_q)
    torch.testing.assert_close(x.grad[2], -g_neg_q)


def _cirtorch_contrastive(x: torch.Tensor, label: torch.Tensor, margin: float, eps: float) -> torch.Tensor:
    """cirtorch's ``contrastive_loss`` transcribed verbatim (its ``x`` is ``(D, M)``)."""
    dim = x.size(0)
    nq = torch.sum(label.data == -1)
    S = x.size(1) // nq
    x1 = x[:, ::S].permute(1, 0).repeat(1, S - 1).view((S - 1) * nq, dim).permute(1, 0)
    idx = [i for i in range(len(label)) if label.data[i] != -1]
    x2 = x[:, idx]
    lbl = label[label != -1]
    dif = x1 - x2
    D = torch.pow(dif + eps, 2).sum(dim=0).sqrt()
    y = 0.5 * lbl * torch.pow(D, 2) + 0.5 * (1 - lbl) * torch.pow(torch.clamp(margin - D, min=0), 2)
    return torch.sum(y)


def test_contrastive_matches_cirtorch() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(3 * 7, 16, dtype=torch.float64, generator=g), dim=1)
    x[2] = x[0] + 0.01  # a close negative so the margin branch is exercised
    label = torch.tensor([-1, 1, 0, 0, 0, 0, 0] * 3)
    ours = contrastive_loss(x, label, margin=0.7)
    ref = _cirtorch_contrastive(x.T, label.to(torch.float64), margin=0.7, eps=1e-6)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)


def test_contrastive_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * 4, 3, dtype=torch.float64, generator=g) * 0.3
    label = torch.tensor([-1, 1, 0, 0] * 2)
    d = (x.reshape(2, 4, 3)[:, :1] - x.reshape(2, 4, 3)[:, 1:]).norm(dim=2)
    assert ((d - 0.7).abs() > 1e-3).all() and (d[:, 1:] < 0.7).any()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: contrastive_loss(z, label, margin=0.7), (x,))


@pytest.mark.parametrize(
    "label",
    [
        [1, -1, 0, 0],  # query not first
        [-1, 1, 0, -1, 1, 0, 0, 0],  # unequal tuples
        [-1, 2, 0, 0],  # unknown label
        [1, 0, 0, 0],  # no query
    ],
)
def test_contrastive_rejects_malformed_tuples(label: list[int]) -> None:
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(len(label), 4), torch.tensor(label))

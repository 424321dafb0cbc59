"""The literal formulation of CRATE-alpha, written from the equations, slow and plain on purpose.

Its modules carry the official release's names (``conv1``, ``pos_embedding``, ``transformer.layers.3.1.fn.D``,
``mlp_head.1``), so its ``state_dict`` is a file of the official layout. Every equation is one line: the two ISTA
steps use the update exactly as written (``A_1 - eta * (A_1 D^T - X) D - eta * lambda``), attention an explicit
softmax. The fast model in :mod:`cratevit.models.crate_alpha` must agree with it (the tests check outputs and
gradients), and ``cratevit bench`` times it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceCRATEAlpha"]


class _PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _SubspaceAttention(nn.Module):  # MSSA: one projection U per head serves as query, key and value
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, heads * dim_head, bias=False)  # U^T
        single_full_head = heads == 1 and dim_head == dim  # then U is square and there is no output projection
        self.to_out = nn.Identity() if single_full_head else nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False))

    def forward(self, x):
        b, n, _ = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, -1).transpose(1, 2)  # b h n p
        scores = w @ w.transpose(-1, -2) / w.shape[-1] ** 0.5
        out = torch.softmax(scores, dim=-1) @ w
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _TwoStepISTA(nn.Module):
    def __init__(self, dim, ratio=4, eta=0.1, lambd=0.1):
        super().__init__()
        self.D = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, ratio * dim)))
        self.D1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(dim, ratio * dim)))
        self.eta, self.lambd = eta, lambd

    def forward(self, x):  # x = LN(Z^{l+1/2}); returns A_2 D_hat^T (the block adds the residual)
        D, eta, lambd = self.D, self.eta, self.lambd
        a1 = F.relu(eta * (x @ D) - eta * lambd)
        a2 = F.relu(a1 - eta * ((a1 @ D.T - x) @ D) - eta * lambd)
        return a2 @ self.D1.T


class _Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_PreNorm(dim, _SubspaceAttention(dim, heads, dim_head)), _PreNorm(dim, _TwoStepISTA(dim))])
            for _ in range(depth)
        )

    def forward(self, z):
        for mssa, ista in self.layers:
            z = z + mssa(z)  # Z^{l+1/2}
            z = z + ista(z)  # Z^{l+1}
        return z


class ReferenceCRATEAlpha(nn.Module):
    """CRATE-alpha exactly as the official code writes it (two literal ISTA steps and the decoder): the oracle the fast
    :class:`~cratevit.models.CRATEAlpha` is tested against."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, dim_head=64, channels=3):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = _Transformer(dim, depth, heads, dim_head)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.conv1(img).flatten(2).transpose(1, 2)  # b n dim
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.mlp_head(self.transformer(x)[:, 0])

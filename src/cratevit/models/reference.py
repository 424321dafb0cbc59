"""The literal reference formulation of CRATE, kept readable and slow on purpose.

It follows the original release's module layout (so its ``state_dict`` has the reference keys) and its math
step by step: three matrix products in ISTA, an explicit softmax in attention. The fast model in
:mod:`cratevit.models.crate` must agree with it (the tests check this), and ``cratevit bench`` times it as the
baseline every speed-up is measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "FeedForward", "PreNorm", "ReferenceCRATE", "Transformer"]


class PreNorm(nn.Module):
    """LayerNorm, then the wrapped module ``fn``."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FeedForward(nn.Module):  # the ISTA step
    """The ISTA step: ``relu(x + eta (x D - x D^T D) - eta lambda)``, three matrix products."""

    def __init__(self, dim, step_size=0.1, lambd=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size = step_size
        self.lambd = lambd

    def forward(self, x):
        x1 = F.linear(x, self.weight)  # x D^T
        grad_1 = F.linear(x1, self.weight.t())  # x D^T D
        grad_2 = F.linear(x, self.weight.t())  # x D
        grad_update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
        return F.relu(x + grad_update)


class Attention(nn.Module):  # MSSA
    """MSSA as the reference writes it: one shared projection ``W`` per head, ``softmax(W W^T / sqrt(d)) W``."""

    def __init__(self, dim, heads, dim_head, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        b, n, _ = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)  # b h n d
        dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        attn = torch.softmax(dots, dim=-1)
        out = torch.matmul(attn, w)
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)  # b n (h d)
        return self.to_out(out)


class Transformer(nn.Module):
    """``depth`` CRATE layers: ``z = x + MSSA(LN(x))``, then ``x = ISTA(LN(z))``."""

    def __init__(self, dim, depth, heads, dim_head, dropout=0.0, ista=0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PreNorm(dim, Attention(dim, heads, dim_head, dropout)), PreNorm(dim, FeedForward(dim, ista))]
            )
            for _ in range(depth)
        )

    def forward(self, x):
        for attn, ff in self.layers:
            grad_x = attn(x) + x
            x = ff(grad_x)
        return x


class ReferenceCRATE(nn.Module):
    """CRATE exactly as the reference code writes it (three-matmul ISTA, explicit softmax attention): the oracle the
    fast :class:`~cratevit.models.CRATE` is tested against, with the same parameter names and shapes."""

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        heads,
        dim_head=64,
        pool="cls",
        channels=3,
        dropout=0.0,
        emb_dropout=0.0,
        ista=0.1,
    ):
        super().__init__()
        ih, iw = image_size if isinstance(image_size, tuple) else (image_size, image_size)
        ph, pw = patch_size if isinstance(patch_size, tuple) else (patch_size, patch_size)
        num_patches = (ih // ph) * (iw // pw)
        patch_dim = channels * ph * pw
        self.ph, self.pw = ph, pw
        self.to_patch_embedding = nn.Sequential(
            nn.Identity(),  # stands for the einops Rearrange at index 0
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, dropout, ista)
        self.pool = pool
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def patchify(self, img):
        # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', written out with unfold
        b, c, _, _ = img.shape
        patches = img.unfold(2, self.ph, self.ph).unfold(3, self.pw, self.pw)  # b c h w p1 p2
        return patches.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, self.ph * self.pw * c)

    def forward(self, img):
        x = self.to_patch_embedding[1:](self.patchify(img))
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embedding[:, : (n + 1)]
        x = self.dropout(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(x)

"""The literal formulation of ToST, written from the equations, slow and plain on purpose.

Its modules carry the official release's names (``patch_embed.proj.2.0``, ``pos_embeder.token_projection``,
``blocks.3.attn.qkv`` / ``temp`` / ``to_out.0``, ``blocks.3.gamma1``, ``cls_attn_blocks.1.attn.proj``), so its
``state_dict`` is a file of the official layout and its parameter count is the official constructor's. Every
equation is one line in the order of the paper: TSSA normalises with ``F.normalize`` over the tokens, works in
(b, h, n, p), and divides by ``1 + s`` through an explicit ``attn = 1 / (1 + s)``; the class attention computes
q, k, v for every token and keeps the class token's query. The fast model in :mod:`cratevit.models.tost` must
agree with it (outputs and gradients; the tests check both). BatchNorm is plain ``nn.BatchNorm2d`` (the official
``nn.SyncBatchNorm`` has the same parameters and buffers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceToST", "naive_causal_tssa"]


class _PositionalEncodingFourier(nn.Module):
    def __init__(self, hidden_dim, dim, temperature=10000):
        super().__init__()
        self.token_projection = nn.Conv2d(2 * hidden_dim, dim, kernel_size=1)
        self.hidden_dim, self.temperature = hidden_dim, temperature

    def forward(self, b, h, w):
        ones = torch.ones(b, h, w)
        y = ones.cumsum(1)  # row index, 1-based
        x = ones.cumsum(2)
        y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
        x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        k = torch.arange(self.hidden_dim, dtype=torch.float32)
        freq = self.temperature ** (2 * (k // 2) / self.hidden_dim)
        px, py = x[..., None] / freq, y[..., None] / freq
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)  # b 2F h w
        w = self.token_projection.weight
        return self.token_projection(pos.to(device=w.device, dtype=w.dtype))


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out))


class _ConvPatchEmbed(nn.Module):
    def __init__(self, patch_size, dim, channels=3):
        super().__init__()
        k = int(math.log2(patch_size))
        widths = [dim // 2 ** (k - 1 - i) for i in range(k)]
        layers, c_in = [], channels
        for i, c_out in enumerate(widths):
            if i:
                layers.append(nn.GELU())
            layers.append(_conv_bn(c_in, c_out))
            c_in = c_out
        self.proj = nn.Sequential(*layers)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _AttentionTSSA(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=qkv_bias)  # U (one projection, not q/k/v)
        self.temp = nn.Parameter(torch.ones(heads, 1))
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # b h n p
        w_hat = F.normalize(w, dim=-2)  # each coordinate over the tokens
        pi = torch.softmax((w_hat**2).sum(dim=-1) * self.temp, dim=1)  # b h n, softmax over HEADS
        pi_bar = pi / (pi.sum(dim=-1, keepdim=True) + 1e-8)  # memberships as weights over tokens
        s = pi_bar.unsqueeze(-2) @ (w**2)  # b h 1 p: Pi-weighted second moments
        attn = 1.0 / (1.0 + s)
        out = -(w * pi.unsqueeze(-1)) * attn
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim, heads, eta, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _AttentionTSSA(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.mlp(self.norm2(x))


class _ClassAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # b h n p each
        attn = torch.softmax((q[:, :, :1] * k).sum(dim=-1) * self.scale, dim=-1)  # b h n: the class token's query
        cls = (attn.unsqueeze(2) @ v).transpose(1, 2).reshape(b, 1, c)
        return torch.cat([self.proj(cls), x[:, 1:]], dim=1)


class _ClassAttentionBlock(nn.Module):
    def __init__(self, dim, heads, eta, tokens_norm=True, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ClassAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls = self.gamma2 * self.mlp(x[:, :1])
        return x + torch.cat([cls, x[:, 1:]], dim=1)


class ReferenceToST(nn.Module):
    """The official ``VisionTransformer(attn_layer=AttentionTSSA)`` written plainly; ``forward`` returns logits."""

    def __init__(
        self,
        *,
        patch_size=16,
        num_classes=1000,
        dim=384,
        depth=12,
        heads=8,
        eta=1.0,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_blocks=2,
        tokens_norm=True,
        pos_dim=32,
        channels=3,
    ):
        super().__init__()
        self.patch_embed = _ConvPatchEmbed(patch_size, dim, channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, eta, mlp_ratio, qkv_bias) for _ in range(depth))
        self.cls_attn_blocks = nn.ModuleList(
            _ClassAttentionBlock(dim, heads, eta, tokens_norm, mlp_ratio, qkv_bias) for _ in range(class_blocks)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pos_embeder = _PositionalEncodingFourier(pos_dim, dim)

    def forward_features(self, x):
        b = x.shape[0]
        x, (h, w) = self.patch_embed(x)
        x = x + self.pos_embeder(b, h, w).reshape(b, -1, x.shape[1]).permute(0, 2, 1)
        for blk in self.blocks:
            x = blk(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def naive_causal_tssa(w, temp, bias):
    """Causal TSSA one position at a time, for ``w`` (b, h, T, p): the statistics of token ``t`` are computed from
    the prefix ``w[:, :, :t+1]`` by explicit sums (the oracle of the cumulative-sum operator)."""
    h, t_len = w.shape[1], w.shape[2]
    outs, pis = [], []
    for t in range(t_len):
        prefix = w[:, :, : t + 1]
        a = w[:, :, t] ** 2 / (prefix**2).sum(dim=2).clamp_min(1e-12) + bias[:, t]  # b h p
        pis.append(torch.softmax(a.sum(dim=-1) * temp.view(1, h), dim=1))  # b h, over heads
        pi_prefix = torch.stack(pis, dim=2)  # b h t+1
        s = (pi_prefix.unsqueeze(-1) * prefix**2).sum(dim=2) / (pi_prefix.sum(dim=2, keepdim=True) + 1e-8)
        outs.append(-(w[:, :, t] * pis[-1].unsqueeze(-1)) / (1.0 + s))
    return torch.stack(outs, dim=2), torch.stack(pis, dim=2)

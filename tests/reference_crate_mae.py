"""The literal reference formulation of CRATE-MAE, readable and slow on purpose.

It follows the official release's module layout (``model/crate_ae/`` of Ma-Lab-Berkeley/CRATE, trained with FAIR's
MAE code), so its ``state_dict`` has the official keys and shapes, and its math step by step: the masking by
shuffling and un-shuffling with ``argsort``/``gather``, three matrix products in the encoder's ISTA step, explicit
softmax attention, the unused ``decoder_embed`` and ``pos_embed`` included. :mod:`cratevit.models.crate_mae` must
agree with it (outputs and gradients).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_numpy(dim: int, grid: int) -> np.ndarray:
    """The 2-D sine-cosine table as MAE builds it (numpy, meshgrid with the column coordinate first)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # x first
    emb = np.concatenate([one_d(dim // 2, coords[0]), one_d(dim // 2, coords[1])], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Attention(nn.Module):  # MSSA
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.qkv = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
        attn = torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(attn, w).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


class EncoderFeedForward(nn.Module):  # one ISTA step, lambda 0.5
    def __init__(self, dim, step_size=0.1, lambd=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size, self.lambd = step_size, lambd

    def forward(self, x):
        x_dt = F.linear(x, self.weight)  # x D^T
        dtd = F.linear(x_dt, self.weight.t())  # x D^T D
        d = F.linear(x, self.weight.t())  # x D
        return F.relu(x + self.step_size * (d - dtd) - self.step_size * self.lambd)


class DecoderFeedForward(nn.Module):  # the linear synthesis step D x
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight)


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)), PreNorm(dim, EncoderFeedForward(dim))])]
        )

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x) + x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, DecoderFeedForward(dim)), PreNorm(dim, Attention(dim, heads, dim_head))])]
        )

    def forward(self, x):
        for ff, attn in self.layers:
            h = ff(x)
            x = h - attn(h)
        return x


class ConvPatches(nn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceCRATEMAE(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_depth=12,
        decoder_num_heads=12,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.p = patch_size
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = ConvPatches(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(EncoderBlock(embed_dim, num_heads, embed_dim // num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, embed_dim)  # present in the official model, never applied
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(embed_dim, decoder_num_heads, embed_dim // decoder_num_heads) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.norm_pix_loss = norm_pix_loss
        table = torch.from_numpy(sincos_2d_numpy(embed_dim, img_size // patch_size)).float()[None]
        self.pos_embed.data.copy_(table)
        self.decoder_pos_embed.data.copy_(table)

    def patchify(self, imgs):
        n, c, h, _ = imgs.shape
        g = h // self.p
        x = imgs.reshape(n, c, g, self.p, g, self.p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, g * g, self.p * self.p * c)

    def masking(self, x, mask_ratio, noise):
        n, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs)
        x, mask, ids_restore = self.masking(x, mask_ratio, noise)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        fill = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        rest = torch.cat([x[:, 1:], fill], dim=1)
        rest = torch.gather(rest, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))  # un-shuffle
        x = torch.cat([x[:, :1], rest], dim=1) + self.decoder_pos_embed  # the official code adds this table
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x):
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, _ = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        return self.forward_loss(imgs, pred, mask), pred, mask

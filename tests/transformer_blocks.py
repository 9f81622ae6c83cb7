"""Transformer blocks written after torchvision's and timm's (neither is installed here), custom
activation modules, and models that torch.fx cannot trace: fixtures for the probe tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's activation: ``x · σ(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class NewGELU(nn.Module):
    """transformers' ``NewGELUActivation``: the tanh approximation, written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Wrapper(nn.Module):
    """A user's wrapper around an activation module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class MLPBlock(nn.Sequential):
    """torchvision's ``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim),
            nn.Dropout(0.1),
        )  # fmt: skip


class TorchvisionEncoderBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock``: pre-norm attention and MLP with residuals."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.1)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """A gated MLP: ``down(silu(gate(x)) · up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """timm's ``Attention``: fused qkv, heads, softmax, proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmBlock(nn.Module):
    """timm's ViT ``Block``; ``mlp`` may be an ``Mlp`` or a ``SwiGLU``."""

    def __init__(
        self, dim: int = 16, heads: int = 2, hidden: int = 32, mlp: nn.Module | None = None
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Token embedding, blocks, mean pooling and a classifier head. ``forward`` iterates over
    a tensor when ``untraceable``, so that torch.fx cannot trace it."""

    def __init__(self, blocks: list[nn.Module], dim: int = 16, classes: int = 3,
                 untraceable: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.untraceable = untraceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        if self.untraceable:
            h = torch.stack([row for row in h])  # iterating a Proxy fails under torch.fx
        return self.head(self.norm(h).mean(1))


class FFN(nn.Module):
    """fc1 → act → fc2 → ReLU → out, with an optional extra module after the activation."""

    def __init__(self, act: nn.Module, extra: nn.Module | None = None, untraceable: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.act = act
        self.extra = extra if extra is not None else nn.Identity()
        self.fc2 = nn.Linear(12, 8)
        self.out = nn.Linear(8, 3)
        self.untraceable = untraceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable and x.sum() > -1e9:  # data-dependent control flow: fx cannot trace
            x = x + 0
        h = self.extra(self.act(self.fc1(x)))
        return self.out(torch.relu(self.fc2(h)))

"""Reference architectures of the paper: LeNet-300-100, LeNet-5 (Caffe) and CaffeNet; and a small
patch transformer on MNIST (:class:`PatchTransformer`) for the transformer example.

They are plain ``nn.Sequential`` networks with named layers, so that a layer can be addressed as
``model.fc1`` or by its qualified name ``"fc1"``. They are untrained. Every constructor takes
``device`` and ``dtype`` factory arguments, so that a network can also be built on
``device="meta"`` (e.g. to count its energy without allocating its weights).
"""

from __future__ import annotations

from collections import OrderedDict

import pytorch_lightning as pl
import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "LeNet300100",
    "LeNet5",
    "LitClassifier",
    "LitPatchTransformer",
    "PatchTransformer",
    "TransformerBlock",
    "caffenet",
    "patch_mask",
]


class LeNet300100(nn.Sequential):
    """LeNet-300-100: a 784→300→100→10 multilayer perceptron with ReLUs.

    Layers: ``flatten, fc1 (784→300), relu1, fc2 (300→100), relu2, fc3 (100→num_classes)``.

    Args:
        num_classes: Output features of ``fc3``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(B, 1, 28, 28)`` or ``(B, 784)``.
        - Output: ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(784, 300, **factory)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(300, 100, **factory)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(100, num_classes, **factory)),
                ]
            )
        )


class LeNet5(nn.Sequential):
    """LeNet-5, Caffe variant (``examples/mnist/lenet_train_test.prototxt``), 28×28×1 input.

    Layers: ``conv1 (5×5, 1→20), pool1 (max 2/2), conv2 (5×5, 20→50), pool2 (max 2/2), flatten,
    fc1 (800→500), relu1, fc2 (500→num_classes)``.

    As in Caffe's model there is no nonlinearity after the convolutions: the only ReLU is between
    ``fc1`` and ``fc2``.

    Args:
        num_classes: Output features of ``fc2``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(B, 1, 28, 28)``.
        - Output: ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 20, kernel_size=5, **factory)),  # 20×24×24
                    ("pool1", nn.MaxPool2d(kernel_size=2, stride=2)),  # 20×12×12
                    ("conv2", nn.Conv2d(20, 50, kernel_size=5, **factory)),  # 50×8×8
                    ("pool2", nn.MaxPool2d(kernel_size=2, stride=2)),  # 50×4×4
                    ("flatten", nn.Flatten()),  # 800
                    ("fc1", nn.Linear(800, 500, **factory)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(500, num_classes, **factory)),
                ]
            )
        )


def caffenet(
    num_classes: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """Build CaffeNet (``bvlc_reference_caffenet``), the single-GPU AlexNet variant of Caffe.

    Layers (input ``(B, 3, 227, 227)``)::

        conv1 11×11/4, 3→96      relu1  pool1 max 3/2  norm1 LRN   → 96×27×27
        conv2 5×5 pad 2, g=2 →256 relu2  pool2 max 3/2  norm2 LRN   → 256×13×13
        conv3 3×3 pad 1, →384     relu3
        conv4 3×3 pad 1, g=2 →384 relu4
        conv5 3×3 pad 1, g=2 →256 relu5  pool5 max 3/2             → 256×6×6
        flatten (9216)
        fc6 9216→4096 relu6 drop6
        fc7 4096→4096 relu7 drop7
        fc8 4096→num_classes

    As in Caffe, pooling comes before local response normalisation (size 5, alpha 1e-4, beta 0.75,
    k 1). The LRN layers have no parameters and cost nothing in the energy model. Caffe rounds
    pooled sizes up, but with these shapes every pooling window fits exactly, so PyTorch's default
    floor mode gives the same shapes.

    Args:
        num_classes: Output features of ``fc8``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Returns:
        The network as an ``nn.Sequential`` with the layer names above.
    """
    factory = {"device": device, "dtype": dtype}

    def lrn() -> nn.LocalResponseNorm:
        return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)

    def pool() -> nn.MaxPool2d:
        return nn.MaxPool2d(kernel_size=3, stride=2)

    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, 96, kernel_size=11, stride=4, **factory)),
                ("relu1", nn.ReLU()),
                ("pool1", pool()),
                ("norm1", lrn()),
                ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2, **factory)),
                ("relu2", nn.ReLU()),
                ("pool2", pool()),
                ("norm2", lrn()),
                ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1, **factory)),
                ("relu3", nn.ReLU()),
                ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2, **factory)),
                ("relu4", nn.ReLU()),
                ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2, **factory)),
                ("relu5", nn.ReLU()),
                ("pool5", pool()),
                ("flatten", nn.Flatten()),
                ("fc6", nn.Linear(9216, 4096, **factory)),
                ("relu6", nn.ReLU()),
                ("drop6", nn.Dropout(0.5)),
                ("fc7", nn.Linear(4096, 4096, **factory)),
                ("relu7", nn.ReLU()),
                ("drop7", nn.Dropout(0.5)),
                ("fc8", nn.Linear(4096, num_classes, **factory)),
            ]
        )
    )


#: Architecture names accepted by :class:`LitClassifier`.
ARCHITECTURES = {"lenet300100": LeNet300100, "lenet5": LeNet5}


class LitClassifier(pl.LightningModule):
    """A minimal LightningModule that trains one of the reference networks with cross-entropy.

    The network is the attribute ``net``, so its layers are named ``"net.fc1"`` and so on.
    Validation logs ``val_acc``; test logs ``test_acc``.

    Args:
        arch: ``"lenet300100"`` or ``"lenet5"``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        epochs: length of the cosine learning-rate schedule (0: constant rate).
    """

    def __init__(
        self,
        arch: str = "lenet300100",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        epochs: int = 0,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"`arch` must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
        self.save_hyperparameters()
        self.net = ARCHITECTURES[arch]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.epochs <= 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def patch_mask(images: torch.Tensor, patch: int = 4, threshold: float = 0.0) -> torch.Tensor:
    """Which patches of ``images`` (B, 1, H, W) hold ink: (B, H/patch · W/patch) long, 1 where
    some pixel of the patch exceeds ``threshold`` (the normalised background is below 0).

    Blank patches are treated as padding: masked out of attention and pooling, and so of the
    neuron-elimination statistics (through the batch's ``attention_mask``).
    """
    B, _, H, W = images.shape
    tiles = images.reshape(B, H // patch, patch, W // patch, patch).amax(dim=(2, 4))
    mask = (tiles > threshold).reshape(B, -1)
    mask[:, 0] |= ~mask.any(-1)  # a blank image keeps one token
    return mask.long()


class _SelfAttention(nn.Module):
    """Multi-head self-attention (timm style): fused ``qkv``, heads, ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """A pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``.

    The FFN pair ``mlp.fc1`` → ``mlp.fc2`` is the junction that neuron elimination reduces.
    """

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict([("fc1", nn.Linear(dim, hidden)), ("act", nn.GELU()),
                         ("fc2", nn.Linear(hidden, dim))])
        )  # fmt: skip

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """A small ViT-style encoder on MNIST: 4×4 pixel patches are the tokens.

    Layers: ``embed`` (16 pixels → dim), ``position`` (an ``nn.Embedding`` of the 49 token
    positions), ``blocks.<i>`` (:class:`TransformerBlock`), ``norm`` and ``head``. The output is
    the masked mean of the tokens, classified by ``head``.

    Args:
        depth: number of blocks.
        dim: token width.
        heads: attention heads.
        hidden: FFN width (``blocks.<i>.mlp.fc1`` → ``blocks.<i>.mlp.fc2``).
        num_classes: classes.
        patch: patch side in pixels (28 must be a multiple).

    Shape:
        - Input: a dict with ``pixel_values`` (B, 1, 28, 28) and ``attention_mask`` (B, 49)
          (1 = token, 0 = padding; see :func:`patch_mask`). The forward pass traces with
          :mod:`torch.fx`, so that the sweep caches the front of the network.
        - Output: (B, num_classes).
    """

    def __init__(
        self, depth: int = 4, dim: int = 64, heads: int = 4, hidden: int = 256,
        num_classes: int = 10, patch: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Embedding(tokens, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("positions", torch.arange(tokens), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images, keep = batch["pixel_values"], batch["attention_mask"].bool()
        B, p = images.shape[0], self.patch
        tokens = images.reshape(B, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4)
        x = self.embed(tokens.reshape(B, -1, p * p)) + self.position(self.positions)
        for block in self.blocks:
            x = block(x, keep)
        weights = keep.to(x.dtype)[..., None]
        pooled = (self.norm(x) * weights).sum(1) / weights.sum(1)
        return self.head(pooled)


class LitPatchTransformer(pl.LightningModule):
    """Trains a :class:`PatchTransformer` on Hugging Face-style dict batches
    (``pixel_values``, ``attention_mask``, ``labels``); ``forward`` takes the whole batch.

    The network is the attribute ``net``: its FFN pairs are ``net.blocks.<i>.mlp.fc1`` →
    ``net.blocks.<i>.mlp.fc2``. Validation logs ``val_acc``; test logs ``test_acc``.

    Args:
        lr: AdamW learning rate.
        epochs: length of the cosine learning-rate schedule (0: constant rate).
        **kwargs: :class:`PatchTransformer` arguments.
    """

    def __init__(self, lr: float = 2e-3, epochs: int = 0, **kwargs: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = PatchTransformer(**kwargs)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        y = batch["labels"]
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        if self.hparams.epochs <= 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.epochs)
        return {"optimizer": opt, "lr_scheduler": sched}

"""Reference architectures of the paper: LeNet-300-100, LeNet-5 (Caffe) and CaffeNet.

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

__all__ = ["ARCHITECTURES", "LeNet300100", "LeNet5", "LitClassifier", "caffenet"]


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

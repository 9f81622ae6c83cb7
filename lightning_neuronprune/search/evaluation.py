"""Evaluating a network with some modules replaced, caching the unchanged front of it.

The consumer's inputs on the evaluation set (and any other values that the rest of the network
needs) are computed once by the unchanged front of the network; for each evaluation only the part
from the consumer onward runs. Keeping p features and deleting the producer's other rows gives
the consumer exactly ``x[..., kept]``, because the modules in between act elementwise, so the
cached path evaluates the reduced network exactly. The split uses :mod:`torch.fx`; when the model
cannot be traced, each evaluation runs the whole network (the fallback, same results).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import Tensor, nn

from lightning_neuronprune.core.batches import TARGET_KEYS, batch_input, call_model
from lightning_neuronprune.core.runtime import evaluating, model_device, to_device
from lightning_neuronprune.errors import NeuronEliminationError
from lightning_neuronprune.search.confirmation import metric_drop
from lightning_neuronprune.structure.modules import replace_module
from lightning_neuronprune.structure.tracing import LeafTracer

__all__ = [
    "CachedEvaluator",
    "batch_target",
    "default_metric",
    "degradation",
    "metric_direction",
    "model_output",
]

log = logging.getLogger(__name__)


def batch_target(batch: Any) -> Tensor:
    """The target of a batch: the second element of a tuple/list, or a ``y``/``target``/``label(s)``
    key of a mapping (Hugging Face-style batches carry ``labels``).

    Token labels (B, T) of a mapping that also holds an ``attention_mask`` of the same shape are
    set to -100 (Hugging Face's ignored label) where the mask is 0, so padding never counts.
    """
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                target, mask = batch[key], batch.get("attention_mask")
                if (
                    isinstance(target, Tensor)
                    and isinstance(mask, Tensor)
                    and not target.is_floating_point()
                    and target.shape == mask.shape
                    and target.ndim == 2
                ):
                    return target.masked_fill(mask == 0, -100)
                return target
    raise NeuronEliminationError(
        f"cannot find the target in a batch of type {type(batch).__name__}; pass `target_fn`"
    )


def model_output(output: Any) -> Tensor:
    """The predictions in a model's output, given to the metric.

    A tensor is taken as is; an object with a ``logits`` attribute or key (Hugging Face's
    ``ModelOutput``, a dict) gives its logits; a tuple or list gives its first element.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise NeuronEliminationError(
        f"the model returned {type(output).__name__}; the sweep evaluates a tensor of predictions "
        "(the output itself, its `logits`, or the first element of a tuple); pass `output_fn`"
    )


def default_metric(
    model: nn.Module,
    example: Any,
    *,
    top_k: int = 1,
    output_fn: Callable[[Any], Tensor] | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Any:
    """Multiclass top-``top_k`` accuracy, with the class count C read from the model's output on
    ``example`` (logits of shape (..., C)), on the device of the model.

    Raises:
        ValueError: the output has fewer than two classes (pass a metric of your own).
    """
    from torchmetrics.classification import MulticlassAccuracy

    with evaluating(model), torch.no_grad(), (forward_context or nullcontext)():
        logits = (output_fn or model_output)(call_model(model, example))
    num_classes = int(logits.shape[-1])
    if num_classes < 2:
        raise ValueError(
            f"the default metric needs class scores, but the model outputs shape "
            f"{tuple(logits.shape)}; pass `metric=`"
        )
    metric = MulticlassAccuracy(num_classes, top_k=min(top_k, num_classes), average="micro")
    return metric.to(model_device(model))


def degradation(baseline: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``baseline``: ``baseline - value`` for a metric where
    higher is better (accuracy), ``value - baseline`` otherwise (a loss, an MSE); the same rule
    as :func:`~lightning_neuronprune.search.confirmation.metric_drop`, which it calls.

    Example:
        >>> degradation(0.75, 0.5), degradation(0.25, 0.5, higher_is_better=False)
        (0.25, 0.25)
    """
    return metric_drop(baseline, value, higher_is_better=higher_is_better)


def metric_direction(metric: Any) -> bool:
    """``metric.higher_is_better``, read as ``True`` when the metric leaves it unset."""
    return getattr(metric, "higher_is_better", None) is not False


def _split(model: nn.Module, consumer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Split ``model`` at ``consumer`` into a prefix that returns the boundary values and a suffix
    that takes them and runs the consumer and everything after it.

    The trace runs in eval mode (each module's mode is restored afterwards): fx bakes
    ``self.training`` into the graph as a constant (``F.dropout(x, training=self.training)``,
    ``if self.training:``), and the cached graph must be the network that is evaluated.
    """
    with evaluating(model):
        graph = LeafTracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == consumer]
    if len(calls) != 1:
        raise NeuronEliminationError(f"{consumer!r} is called {len(calls)} times")
    after: set[torch.fx.Node] = set()
    stack = [calls[0]]
    while stack:
        node = stack.pop()
        if node not in after:
            after.add(node)
            stack.extend(node.users)
    boundary = [
        n for n in graph.nodes
        if n not in after and n.op != "get_attr" and any(u in after for u in n.users)
    ]  # fmt: skip

    prefix = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        if node in after:
            continue
        env[node] = prefix.node_copy(node, lambda a: env[a])
    prefix.output(tuple(env[b] for b in boundary))

    suffix = torch.fx.Graph()
    senv: dict[torch.fx.Node, torch.fx.Node] = {
        b: suffix.placeholder(f"boundary_{i}") for i, b in enumerate(boundary)
    }
    for node in graph.nodes:
        if node in after or node.op == "get_attr" and any(u in after for u in node.users):
            senv[node] = suffix.node_copy(node, lambda a: senv[a])
    return torch.fx.GraphModule(model, prefix), torch.fx.GraphModule(model, suffix)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _suffix_mutates(suffix: torch.fx.GraphModule, boundary: tuple[Any, ...]) -> tuple[bool, Any]:
    """Whether ``suffix`` modifies its inputs in place (``x.add_(...)``, an in-place op on a view
    of one), and its output: one trial run on copies of ``boundary``, read from the copies'
    version counters (shared with their views; no device read). Inference tensors have no
    version counter, so they are assumed to be modified."""
    copies = pytree.tree_map(_clone, boundary)
    tensors = [t for t in pytree.tree_leaves(copies) if isinstance(t, Tensor)]
    if any(t.is_inference() for t in tensors):
        return True, suffix(*copies)
    versions = [t._version for t in tensors]
    out = suffix(*copies)
    return [t._version for t in tensors] != versions, out


def _channels_last(value: Any) -> Any:
    """A 4-D floating-point tensor in channels-last layout (same values), anything else as is."""
    if isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the round-off of a different convolution algorithm (in float64)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0))


class CachedEvaluator:
    """Evaluates a model with a replaced consumer, running only the part from the consumer onward.

    Args:
        model: the network (not modified; the cached suffix shares its modules).
        consumer: the qualified name of the consumer ``nn.Linear``.
        data: evaluation batches.
        metric: a ``torchmetrics.Metric`` taking ``(preds, target)``; it is reset before each use.
        input_fn: maps a batch to the model input (default :func:`batch_input`); the model is
            called through :func:`~lightning_neuronprune.core.batches.call_model`.
        target_fn: maps a batch to the target (default :func:`batch_target`).
        output_fn: maps the model output to the metric's predictions (default
            :func:`model_output`).
        device: where to run; defaults to the model's device.
        cache: set to ``False`` to force the uncached fallback (for comparisons).
        transfer: maps each raw batch to the batch the model runs on, before ``input_fn`` and
            ``target_fn`` (e.g. a Trainer's precision ``convert_input`` and ``batch_to_device``).
            Raw batches are kept and transferred when used, as a Trainer does each epoch.
        forward_context: a context-manager factory entered around every forward pass (e.g. the
            precision plugin's ``forward_context``).
        channels_last: keep cached 4-D values channels-last (see the attribute): ``None``
            (default) on the CPU, ``True`` on any device, ``False`` never.

    Attributes:
        cached: whether the fx split succeeded and the traced front ran on the data, so the
            front is cached (a front that cannot run, e.g. on an untraceable input, falls back to
            full passes). A part after the consumer that updates the cached values in place
            (``x.add_(...)``) is found by one trial run and gets copies on each evaluation.
        channels_last: whether the cached 4-D values (conv feature maps) are kept in
            channels-last layout. By default, on the CPU they are, when the part after the
            consumer gives the same output from them in one trial run: oneDNN's convolutions,
            and pooling even more, run several times faster on it than on the default layout,
            and each point of a conv sweep runs that part once. A part that cannot take that
            layout (e.g. ``x.view(x.size(0), -1)`` on a feature map) keeps the default one.
        higher_is_better: the metric's direction (``metric.higher_is_better``; unset counts as
            higher is better). :meth:`degradation` uses it.
    """

    def __init__(
        self,
        model: nn.Module,
        consumer: str,
        data: Iterable[Any],
        metric: Any,
        *,
        input_fn: Callable[[Any], Any] | None = None,
        target_fn: Callable[[Any], Tensor] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        device: torch.device | str | None = None,
        cache: bool = True,
        transfer: Callable[[Any], Any] | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.model = model
        self.consumer = consumer
        self.metric = metric
        self.higher_is_better = metric_direction(metric)
        self._output = output_fn or model_output
        self.device = torch.device(device) if device is not None else model_device(model)
        get_input = input_fn or batch_input
        get_target = target_fn or batch_target
        self._context = forward_context or nullcontext
        self._batches: list[Any]
        if transfer is None:
            self._batches = [(get_input(b), get_target(b)) for b in data]
        else:  # transferred (to the device, in the model's dtype) only when used
            self._batches = [_Lazy(b, transfer, get_input, get_target) for b in data]
        if not self._batches:
            raise NeuronEliminationError("the evaluation data is empty")
        self.cached = False
        self._suffix: torch.fx.GraphModule | None = None
        self._boundaries: list[tuple[Any, ...]] = []
        self._copy = False
        self.channels_last = False
        if cache:
            try:
                prefix, suffix = _split(model, consumer)
                boundaries, targets = [], []
                with evaluating(model), torch.no_grad(), self._context():
                    for x, y in self._batches:
                        boundaries.append(call_model(prefix, to_device(x, self.device)))
                        targets.append(to_device(y, self.device))
                    with evaluating(suffix):
                        copy, out = _suffix_mutates(suffix, boundaries[0])
                    if copy:  # the update may reach a value that the prefix read before it
                        x, _ = self._batches[0]
                        full = call_model(model, to_device(x, self.device))
                        if not torch.allclose(
                            self._output(out), self._output(full), equal_nan=True
                        ):
                            raise NeuronEliminationError(
                                "an in-place update after the consumer changes a value read "
                                "before it; the split differs from the model"
                            )
            except Exception as err:  # any failure falls back to full passes
                log.info("evaluation cache disabled for %r (%s): full forward per p", consumer, err)
            else:
                self._suffix, self._boundaries = suffix, boundaries
                # a suffix that updates its inputs in place gets copies on each evaluation
                self._copy = copy
                # keep the targets only, on the device: no copies per evaluation
                self._batches = [(None, y) for y in targets]
                self.cached = True
                if channels_last or (channels_last is None and self.device.type == "cpu"):
                    self._to_channels_last(out)

    def _to_channels_last(self, reference: Any) -> None:
        """Keep the cached 4-D values channels-last if the suffix gives ``reference`` (its
        output on the first batch) from them; otherwise leave them as they are."""
        if not any(_channels_last(t) is not t for t in pytree.tree_leaves(self._boundaries[0])):
            return
        trial = pytree.tree_map(_channels_last, self._boundaries[0])
        try:
            suffix: Any = self._suffix
            with evaluating(self.model), evaluating(suffix), torch.no_grad(), self._context():
                out = suffix(*pytree.tree_map(_clone, trial))
            same = _close(self._output(out), self._output(reference))
        except Exception as err:  # any failure keeps the default layout
            log.info("channels-last cache disabled for %r (%s)", self.consumer, err)
            return
        if same:
            self._boundaries = [pytree.tree_map(_channels_last, b) for b in self._boundaries]
            self.channels_last = True

    @torch.no_grad()
    def __call__(
        self,
        replacement: nn.Module | None = None,
        *,
        modules: Mapping[str, nn.Module] | None = None,
        sync: bool = True,
    ) -> float | Tensor:
        """The metric of the network with some modules temporarily replaced.

        Args:
            replacement: the module that stands in for the consumer. It reads the consumer's
                full original input (e.g. a :class:`GatheredLinear` of the kept features).
            modules: more replacements, by qualified name. In the cached mode, only modules
                from the consumer onward can be replaced (see :meth:`replaceable`).
            sync: return a Python float (reads the device). With ``False`` the metric's
                value stays a tensor on the device, so that several evaluations can be queued
                before one read.
        """
        self.metric.reset()
        root: nn.Module = self._suffix if self.cached else self.model  # type: ignore[assignment]
        swaps = dict(modules or {})
        if replacement is not None:
            swaps[self.consumer] = replacement
        originals = {name: root.get_submodule(name) for name in swaps}
        try:
            for name, module in swaps.items():
                replace_module(root, name, module)
            with evaluating(self.model), evaluating(root), self._context():
                for k, (x, y) in enumerate(self._batches):
                    if not self.cached:
                        out = call_model(root, to_device(x, self.device))
                    elif self._copy:  # the suffix would rewrite the cached values
                        out = root(*pytree.tree_map(_clone, self._boundaries[k]))
                    else:
                        out = root(*self._boundaries[k])
                    self.metric.update(self._output(out), to_device(y, self.device))
            value = self.metric.compute()
            return float(value) if sync else value
        finally:
            for name, module in originals.items():
                replace_module(root, name, module)

    def degradation(self, baseline: float, value: float) -> float:
        """The drop of the metric from ``baseline`` to ``value`` (see :func:`degradation`)."""
        return degradation(baseline, value, self.higher_is_better)

    def replaceable(self, name: str) -> bool:
        """Whether module ``name`` runs in the evaluated part (always true when not cached)."""
        if not self.cached:
            return True
        try:
            self._suffix.get_submodule(name)  # type: ignore[union-attr]
        except AttributeError:
            return False
        return True


class _Lazy:
    """A raw batch that unpacks to ``(input, target)`` of its transferred form, on each use."""

    def __init__(
        self, batch: Any, transfer: Callable[[Any], Any], get_input: Callable[[Any], Any],
        get_target: Callable[[Any], Any],
    ) -> None:  # fmt: skip
        self.batch, self.transfer = batch, transfer
        self.get_input, self.get_target = get_input, get_target

    def __iter__(self):
        moved = self.transfer(self.batch)
        return iter((self.get_input(moved), self.get_target(moved)))

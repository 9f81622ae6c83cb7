"""The forward passes of the behavioural probe (:mod:`~lightning_neuronprune.structure.probe`):
a baseline, then passes with some producers' output features perturbed and every other
``nn.Linear`` clamped to its baseline output, of the whole model or of one block alone.

**Baseline** (one pass of the whole model, at construction): the input and output of every
``nn.Linear`` call, a fingerprint of every module's output, the network output; and the
arguments and output of the first block of each kind
(:class:`~lightning_neuronprune.structure.block_scope.BlockRecorder`).

**Block scope.** While :attr:`ProbePasses.scope` names a block, a pass runs that block alone on
copies of its recorded arguments
(:class:`~lightning_neuronprune.structure.block_scope.BlockScope`), about 1/L of a forward for L
blocks. The block is first run once unperturbed (:meth:`ProbePasses.replays`); it is used only
if it gives the whole model's values (every ``nn.Linear`` it calls, with the same inputs and
outputs and as many calls, and its output). A perturbed pass then records whether the block's
output or arguments changed (:attr:`~lightning_neuronprune.structure.perturbation.Trace.leaked`),
read with the changed features in the pass's one host read.

**Cost**: :attr:`ProbePasses.passes` counts every pass, :attr:`ProbePasses.full_passes` those
of the whole model, :attr:`ProbePasses.block_passes` those of one block, and
:attr:`ProbePasses.cost` the full-forward equivalents (a block pass as 1/L).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.core.batches import call_model
from lightning_neuronprune.core.runtime import evaluating
from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.block_scope import (
    BlockRecorder,
    BlockScope,
    first_blocks,
    state_tensors,
)
from lightning_neuronprune.structure.blocks import repeated_block
from lightning_neuronprune.structure.perturbation import (
    TOLERANCE,
    Trace,
    changed_features,
    changes_to_host,
    differ,
    differs,
    fingerprint,
    perturbed,
    tensors,
    to_host,
)

log = logging.getLogger(__name__)

__all__ = ["ProbePasses"]

_LEAK = " leaked"  # not a module name: the leak flag travels with the changed features


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    with evaluating(model), torch.no_grad():
        yield


class ProbePasses:
    """The probe's passes on one batch (see the module docstring); the probe's decisions are
    :class:`~lightning_neuronprune.structure.probe.JunctionProbe`'s.

    Args:
        model: the network; it is run in ``eval()`` mode under ``torch.no_grad()``, and left
            unchanged (modes restored, hooks removed, also on error).
        example: one model input (see :func:`~lightning_neuronprune.core.batches.batch_input`),
            already on the model's device. A few samples are enough.
        call: runs the model on ``example`` (default
            :func:`~lightning_neuronprune.core.batches.call_model`).
        tolerance: relative change below which a value counts as unchanged.
        context: a context-manager factory entered around the passes that run one block alone
            (the context ``call`` enters, such as a precision plugin's ``forward_context``).

    Attributes:
        baseline: the whole model's baseline pass.
        scope: the block the passes run, or ``None`` for the whole model.
        passes: forward passes so far, of the whole model or of one block.
        full_passes: passes of the whole model.
        block_passes: passes of one block alone.
        cost: full-forward equivalents, a pass of one of L blocks counted as 1/L.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Any,
        *,
        call: Callable[[nn.Module, Any], Any] | None = None,
        tolerance: float = TOLERANCE,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.model = model
        self.example = example
        self.call = call or call_model
        self.tolerance = tolerance
        self.context = context or nullcontext
        self.passes = self.full_passes = self.block_passes = 0
        self.cost = 0.0
        self.scope: BlockScope | None = None  # the block the passes run, or the whole model
        self._scopes: dict[str, BlockScope | None] = {}
        self._blocks = BlockRecorder(model, first_blocks(model))
        try:
            with self._blocks.recording():
                self.baseline = self.run(fingerprints=True)
        except Exception as err:  # the user's model or example is at fault: say so
            raise JunctionError(
                f"the model fails on the probe's example ({type(err).__name__}: {err}); the "
                "probe needs one batch that the unchanged model runs on"
            ) from err

    def linears(self) -> dict[str, nn.Linear]:
        """Every ``nn.Linear`` of the model, by name."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    def run(self, perturb: dict[str, Tensor] | None = None, *, fingerprints: bool = False) -> Trace:
        """One forward pass, of the whole model or of the block in scope. With ``perturb``
        (``{producer: features}``), those features of each producer are perturbed and every
        other ``nn.Linear`` call returns its baseline output."""
        trace = Trace()
        clamp = perturb is not None
        base = self.base if clamp else Trace()

        def linear_hook(name: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
                if not clamp:  # the baseline keeps copies
                    trace.inputs.setdefault(name, []).append(args[0].detach().clone())
                    trace.outputs.setdefault(name, []).append(output.detach().clone())
                    return None
                k = len(trace.changed.setdefault(name, []))
                old_in = base.inputs.get(name, [])
                trace.changed[name].append(  # on the device; read once after the pass
                    changed_features(args[0], old_in[k], self.tolerance)
                    if k < len(old_in)
                    else torch.zeros(0, dtype=torch.bool, device=args[0].device)
                )
                if name in perturb:  # type: ignore[operator]
                    return perturbed(output, perturb[name])  # type: ignore[index]
                old = base.outputs.get(name, [])
                if k < len(old) and old[k].shape == output.shape:
                    # a copy: an in-place module after this layer (LeakyReLU(inplace=True))
                    # would otherwise rewrite the stored baseline for every later pass
                    return old[k].clone()
                return None

            return hook

        def module_hook(name: str, leaf: bool) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                # only leaves make the path; the others are counted (which modules ran)
                trace.fingerprints.append((name, fingerprint(output) if leaf else empty))

            return hook

        empty = torch.zeros(0, dtype=torch.float64)

        handles = []
        try:
            for name, m in self.model.named_modules():
                if isinstance(m, nn.Linear):
                    handles.append(m.register_forward_hook(linear_hook(name)))
                elif fingerprints:
                    leaf = next(m.children(), None) is None
                    handles.append(m.register_forward_hook(module_hook(name, leaf)))
            out, state = self.forward()
            if self.scope is None:
                trace.output = [t.detach().clone() for t in tensors(out)]
            else:
                trace.output = [t.detach().clone() for t in state_tensors(out)]
                trace.state = [t.detach().clone() for t in state]
                if clamp:  # read with the changed features
                    trace.changed[_LEAK] = [self.leak(trace).reshape(1)]
            trace.changed = changes_to_host(trace.changed)
            trace.leaked = bool(trace.changed.pop(_LEAK, [torch.zeros(1, dtype=torch.bool)])[0])
        finally:
            for h in handles:
                h.remove()
        return trace

    @property
    def base(self) -> Trace:
        """The baseline the passes compare with: the whole model's, or the block's own."""
        if self.scope is None or self.scope.baseline is None:
            return self.baseline
        return self.scope.baseline

    def forward(self) -> tuple[Any, list[Tensor]]:
        """Run the whole model on the example, or the block in scope on copies of its recorded
        arguments (then with their tensors afterwards); counted."""
        self.passes += 1
        with _evaluating(self.model):
            if self.scope is None:
                self.full_passes += 1
                self.cost += 1.0
                return self.call(self.model, self.example), []
            self.block_passes += 1
            self.cost += self.scope.share
            with self.context():
                return self.scope.replay()

    def leak(self, trace: Trace) -> Tensor:
        """0-d bool on the device: the block's output or arguments differ from its baseline."""
        base = self.base
        new, old = [*trace.output, *trace.state], [*base.output, *base.state]
        if len(new) != len(old) or not new:
            return torch.tensor(len(new) != len(old))
        flags = [differ(a, b, self.tolerance) for a, b in zip(new, old, strict=True)]
        return torch.stack([f.to(flags[0].device) for f in flags]).any()

    def scope_of(self, producer: str) -> BlockScope | None:
        """The block that ``producer``'s probe passes run (``None``: the whole model)."""
        block = repeated_block(self.model, producer)
        if block is None:
            return None
        name = block[0]
        if name not in self._scopes:
            scope = self._blocks.scope(name)
            self._scopes[name] = scope if scope is not None and self.replays(scope) else None
        scope = self._scopes[name]
        if scope is None or scope.baseline is None or producer not in scope.baseline.inputs:
            return None  # a layer of the block that the block itself does not call
        return scope

    def replays(self, scope: BlockScope) -> bool:
        """Run the block alone (its baseline): it must show the whole model's baseline, the
        same inputs and outputs of every ``nn.Linear`` it calls, and the same output."""
        self.scope = scope
        try:
            replay = self.run(fingerprints=True)
        except Exception as err:  # the block cannot run alone: the whole model decides
            log.debug("block %s does not run alone (%s: %s)", scope.name, type(err).__name__, err)
            return False
        finally:
            self.scope = None
        full = self.baseline
        pairs = list(zip(replay.output, scope.output, strict=False))
        for name, inputs in replay.inputs.items():
            if len(inputs) != len(full.inputs.get(name, [])):
                return False
            new = [*inputs, *replay.outputs[name]]
            pairs += zip(new, [*full.inputs[name], *full.outputs[name]], strict=True)
        flags = [differ(a, b, self.tolerance).reshape(1) for a, b in pairs]
        if len(replay.output) != len(scope.output) or any(bool(f) for f in to_host(flags)):
            log.debug("block %s alone does not give the whole model's values", scope.name)
            return False
        scope.baseline = replay
        return True

    def output_changed(self, trace: Trace) -> bool:
        """Whether a pass of the whole model changed the network output."""
        old = self.baseline.output
        return len(trace.output) != len(old) or any(
            differs(a, b, self.tolerance) for a, b in zip(trace.output, old, strict=True)
        )

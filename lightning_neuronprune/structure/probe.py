"""Junctions found by behaviour: a probe of the model on one real batch.

:mod:`torch.fx` proves a junction on the code, but many real models cannot be traced (Hugging Face
transformers), or use activation modules that no list of types knows (``GELUActivation``,
``NewGELUActivation``, QuickGELU, users' wrappers). The probe proves it on behaviour instead:

1. **Baseline** (one forward pass, shared by every producer): record the input and output of every
   ``nn.Linear`` call and a fingerprint of every module's output.
2. **Reach** (one pass): add ``δ = 1 + |y|`` to every output feature of the producer, while every
   other ``nn.Linear`` returns its baseline output, so a change travels only through the
   parameter-free or per-feature modules that follow the producer, and stops at the next
   ``nn.Linear``. Exactly one ``nn.Linear`` input may change (the consumer), and the network
   output may not (a residual path around the consumer). Modules whose output changed form the
   path; a ``BatchNorm1d`` of n features on it is sliced with the producer, any other module with
   per-feature parameters is refused.
3. **Feature map** (2⌈log₂ n⌉ passes): perturb the features whose index has bit b set, then
   those where it is clear. The consumer's input may change only in the perturbed features. Both
   patterns together pin every producer feature j to consumer feature j: a one-to-one,
   elementwise path. LayerNorm, softmax and attention change other features and are refused.
   The first pattern runs at once (it refuses most feature mixes); the others run after 5.
4. **Gate partners** (two passes per candidate): another ``nn.Linear`` of the same width that
   reads the same input and whose features also reach the consumer (SwiGLU's ``up_proj`` next
   to ``gate_proj``, T5's ``wi_1`` next to ``wi_0``) is a second producer; it must pass the first
   pattern alone, and the other patterns perturb every producer together (changes in consumer
   features outside the pattern would show a mix from either). A producer of 2n outputs that
   reaches a consumer of n features is a fused ``gate_up_proj``: each half is mapped in turn,
   feature j and n + j to consumer feature j.
5. **Narrowing** (one pass): run the network with feature j cut from every producer (both halves
   of a fused one) and the consumer's matching column removed. The consumer must then read
   exactly its baseline input without that feature. Reshapes into attention heads (which keep
   every feature apart, so the patterns pass), and gated products whose partner was not found,
   fail here.

Perturbation ``δ = 1 + |y|`` maps every value to a different one of at least 1, so even a neuron
that is dead under a ReLU on the whole batch shows up. Everything is deterministic: no random
numbers, fixed feature patterns.

**Cost:** one shared baseline pass, then per producer of n features at most 2 + 2⌈log₂ n⌉ forward
passes on the probe batch (24 for a 1536-wide FFN), plus 2 for a gate partner (its reach and
first pattern: the other patterns perturb every producer together), or 2⌈log₂ n⌉ more for a
fused producer's second half; refusals stop early, most after 1 or 2 (the narrowing runs after
the first pattern, so attention heads are refused after 3).

**Block scope.** A producer inside a block (an element of a ``ModuleList``/``Sequential``, such as
a decoder layer) is probed by running that block alone on the arguments the baseline recorded
(:mod:`~lightning_neuronprune.structure.probe_passes`), so each of those passes costs about 1/L of
a forward for L blocks. A refusal found inside the block stands: the whole model would show the
same change, or more. An acceptance stands when no pass changed the block's output or its
arguments (a key/value cache it writes into). When the perturbation leaves the block and the
verdict depends on where it goes (a layer before the residual sum, whose output reaches no
``nn.Linear`` inside its block), the whole model is probed instead. So the whole model runs
for the baseline, the layers whose outputs leave their blocks, and the layers outside any block.
:func:`~lightning_neuronprune.structure.discovery.auto_junctions` probes one block of each kind
of repeated block only: ``targets="auto"`` on a 30-layer SmolLM-135M shape costs 2 full forwards
and 33 passes of one decoder layer, about 3 forwards in all.

Memory: the inputs and outputs of every ``nn.Linear`` call on the probe batch, so keep the batch
small (the callback uses 8 samples).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neuronprune.errors import JunctionError
from lightning_neuronprune.structure.block_scope import state_tensors
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import replace_module
from lightning_neuronprune.structure.perturbation import (
    TOLERANCE,
    ProbeResult,
    Trace,
    bit_patterns,
    describe_indices,
    differ,
    differs,
    per_feature_state,
    to_host,
)
from lightning_neuronprune.structure.probe_passes import ProbePasses
from lightning_neuronprune.structure.surgery import apply_reduction

log = logging.getLogger(__name__)

__all__ = ["JunctionProbe", "ProbeResult"]


class _LeavesBlock(Exception):
    """A pass at block scope cannot decide: the perturbation left the block where the answer
    depends on what it reaches outside. The probe then runs the whole model."""


class JunctionProbe(ProbePasses):
    """Finds the consumer of a producer ``nn.Linear`` by its behaviour on one batch.

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

    The baseline pass runs at construction; :meth:`find` probes one producer.

    Attributes:
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
        super().__init__(model, example, call=call, tolerance=tolerance, context=context)
        self._leaked = False  # a pass of the current find changed its block's output or arguments

    def find(self, producer: str) -> ProbeResult:
        """The consumer of ``producer``'s output features, or a :class:`JunctionError`.

        A gated FFN is found from either producer: another ``nn.Linear`` of the same width that
        reads the same input (every gated family does) and whose features reach the same
        consumer one to one is a second producer, and the narrowing then cuts all of them
        together. A producer of 2n outputs whose halves both reach a consumer of n features
        one to one is a fused ``gate_up_proj``.

        A producer inside a block (an element of a ``ModuleList``/``Sequential``) whose
        arguments the baseline recorded, and that replays them to the same values, is probed by
        running that block alone: a pass then costs 1/L of a forward for L blocks. The verdict
        is the whole model's: a refusal inside the block stands (the whole model would show the
        same or more), and so does an acceptance, when no pass changed the block's output or
        arguments. Otherwise (the perturbation leaves the block and the answer depends on where
        it goes) the whole model is probed.

        Raises:
            JunctionError: the producer does not run exactly once on the batch; its features
                reach no ``nn.Linear``, several, or the network output around the consumer; a
                module with per-feature parameters other than one ``BatchNorm1d`` lies on the
                path; narrowing the producer(s) breaks the forward pass (attention heads, a
                gated product whose partner was not found) or changes other consumer
                features; the path mixes features.
        """
        linears = self.linears()
        if producer not in linears:
            raise JunctionError(f"the model has no nn.Linear named {producer!r}")
        self._runs_once(producer)
        scope = self.scope_of(producer)
        start = self.passes
        if scope is not None:
            self.scope, self._leaked = scope, False
            try:
                return self._find(producer, linears, start)
            except _LeavesBlock as why:
                log.debug("probing %s: %s; probing the whole model", producer, why)
            finally:
                self.scope = None
        return self._find(producer, linears, start)

    def _find(self, producer: str, linears: dict[str, nn.Linear], start: int) -> ProbeResult:
        n = linears[producer].out_features
        trace = self.run({producer: torch.ones(n, dtype=torch.bool)}, fingerprints=True)
        consumer, _ = self._reached((producer,), trace)
        self._leaked = trace.leaked
        cons = linears[consumer]
        h = cons.in_features
        fused = n == 2 * h and len(self.baseline.inputs[consumer]) == 1
        if (h != n and not fused) or len(self.baseline.inputs[consumer]) != 1:
            raise JunctionError(
                f"the output of {producer!r} ({n} features) reaches {consumer!r}, which reads "
                f"{h} features in {len(self.baseline.inputs[consumer])} call(s); a junction "
                "needs a one-to-one path (or the two halves of a fused gate/up producer) to a "
                "consumer that runs once"
            )
        self._check_output(producer, consumer, trace)
        patterns = list(bit_patterns(h))
        # one pattern first (it refuses most feature mixes), then the narrowing (it refuses
        # attention heads at once), then the other patterns, on every producer together
        self._feature_map((producer,), consumer, h, fused, patterns[:1])
        path, batchnorm = self._path(producer, consumer, h, trace)
        partners = [] if fused else self._partners(producer, consumer, h, linears, patterns[:1])
        order = {name: i for i, name in enumerate(linears)}
        producers = tuple(sorted([producer, *partners], key=order.__getitem__))
        self._narrow(producers, consumer, batchnorm, h, path, fused)
        self._feature_map(producers, consumer, h, fused, patterns[1:])
        if self._leaked:
            raise _LeavesBlock(f"perturbing {producer!r} changes the block's output or arguments")
        return ProbeResult(
            producers[0], consumer, batchnorm, path, self.passes - start, producers, fused
        )

    def _runs_once(self, producer: str) -> None:
        calls = len(self.baseline.inputs.get(producer, []))
        if calls != 1:
            raise JunctionError(
                f"layer {producer!r} runs {calls} times in the probe's forward pass; a layer "
                "must run exactly once to be reduced"
            )

    def _check_output(self, producer: str, consumer: str, trace: Trace) -> None:
        if self.scope is None and self.output_changed(trace):
            raise JunctionError(
                f"the output of {producer!r} reaches the network output other than through its "
                f"consumer {consumer!r} (a residual connection, or the activations are "
                "returned); its neurons cannot be removed"
            )

    def _feature_map(
        self,
        producers: tuple[str, ...],
        consumer: str,
        h: int,
        fused: bool,
        patterns: list[Tensor],
    ) -> None:
        """Perturbing features P of every producer (in each half of a fused one in turn) may
        change only consumer features P. Over the bit patterns and their complements this pins
        producer feature j (of each producer) to consumer feature j."""
        none = torch.zeros(h, dtype=torch.bool)
        names = " and ".join(repr(p) for p in producers)
        for pattern in patterns:
            masks = [torch.cat([pattern, none]), torch.cat([none, pattern])] if fused else [pattern]
            for mask in masks:
                trace = self.run(dict.fromkeys(producers, mask))
                reached, changed = self._reached(producers, trace)
                if reached != consumer or bool((changed & ~pattern).any()):
                    raise JunctionError(
                        f"the path from {names} to {consumer!r} mixes features: perturbing "
                        f"features {describe_indices(mask)} of {names} changed features "
                        f"{describe_indices(changed)} of the input of {reached!r}; only "
                        "elementwise modules may lie between the two (LayerNorm, softmax and "
                        "attention mix features)"
                    )
                self._leaked |= trace.leaked

    def _partners(
        self,
        producer: str,
        consumer: str,
        n: int,
        linears: dict[str, nn.Linear],
        patterns: list[Tensor],
    ) -> list[str]:
        """The other producers of a gated junction: layers of width n that read the same input
        as ``producer`` and reach ``consumer`` (one reach pass per candidate), checked on
        ``patterns`` (the rest are checked on all producers together)."""
        x = self.baseline.inputs[producer][0]
        shaped = [
            name
            for name, m in linears.items()
            if name != producer
            and m.out_features == n
            and len(self.baseline.inputs.get(name, [])) == 1
            and self.baseline.inputs[name][0].shape == x.shape
        ]
        same = to_host([differ(self.baseline.inputs[c][0], x, self.tolerance) for c in shaped])
        found = []
        for name in [c for c, d in zip(shaped, same, strict=True) if not bool(d)]:
            if self.scope is not None and name not in self.base.inputs:
                raise _LeavesBlock(f"{name!r}, which the block does not call, reads the same input")
            trace = self.run({name: torch.ones(n, dtype=torch.bool)}, fingerprints=True)
            try:
                reached, _ = self._reached((name,), trace)
            except JunctionError:
                continue
            if reached != consumer:
                continue
            if trace.leaked:
                raise _LeavesBlock(f"perturbing {name!r} changes the block's output or arguments")
            self._check_output(name, consumer, trace)
            self._feature_map((name,), consumer, n, False, patterns)
            if self._path(name, consumer, n, trace)[1] is not None:
                raise JunctionError(
                    f"a BatchNorm1d lies on the gated path from {name!r} to {consumer!r}; gated "
                    "junctions with a batch norm are not supported"
                )
            found.append(name)
        return found

    def _reached(self, perturbed: tuple[str, ...], trace: Trace) -> tuple[str, Tensor]:
        producer = " and ".join(repr(p) for p in perturbed)
        reached: dict[str, Tensor] = {}
        for name, per_call in trace.changed.items():
            if name in perturbed:
                continue
            for changed in per_call:
                if changed.any():
                    reached[name] = reached[name] | changed if name in reached else changed
        if not reached and trace.leaked:
            raise _LeavesBlock(f"the output of {producer} leaves the block")
        if not reached:
            out_changed = self.scope is None and self.output_changed(trace)
            raise JunctionError(
                f"the output of {producer} reaches no nn.Linear"
                + (
                    ": it is (or flows into) the network output, so it has no consumer"
                    if out_changed
                    else " and does not change the network output (unused on the probe batch)"
                )
            )
        if len(reached) > 1:
            raise JunctionError(
                f"the output of {producer} feeds {len(reached)} nn.Linear layers "
                f"{sorted(reached)}"
                + (f" in block {self.scope.name!r} (and leaves it)" if trace.leaked else "")
                + "; a junction must have exactly one consumer nn.Linear (a gate read twice "
                "cannot be reduced)"
            )
        ((name, changed),) = reached.items()
        return name, changed

    def _path(
        self, producer: str, consumer: str, n: int, trace: Trace
    ) -> tuple[tuple[str, ...], str | None]:
        modules = dict(self.model.named_modules())
        base = self.base.fingerprints
        if len(base) != len(trace.fingerprints):
            if trace.leaked:
                raise _LeavesBlock(f"perturbing {producer!r} changes which modules run")
            raise JunctionError(
                f"perturbing {producer!r} changed which modules run; the forward pass depends on "
                "the values of its output"
            )
        path: list[str] = []
        batchnorm = None
        pairs = zip(base, trace.fingerprints, strict=True)
        changed = to_host([differ(new, old, self.tolerance) for (_, old), (_, new) in pairs])
        for (name, _), moved in zip(base, changed, strict=True):
            m = modules[name]
            if not moved or any(True for _ in m.children()):
                continue
            path.append(f"{name} ({type(m).__name__})")
            if isinstance(m, nn.BatchNorm1d) and m.num_features == n and batchnorm is None:
                batchnorm = name
            elif per_feature_state(m, n):
                raise JunctionError(
                    f"between {producer!r} and {consumer!r} lies {name!r} "
                    f"({type(m).__name__}) with per-feature parameters; only one BatchNorm1d "
                    "can be sliced with the producer"
                )
        return tuple(path), batchnorm

    def _narrow(
        self,
        producers: tuple[str, ...],
        consumer: str,
        batchnorm: str | None,
        n: int,
        path: tuple[str, ...],
        fused: bool,
    ) -> None:
        """Run the network with feature ``n // 2`` removed from every producer (both halves of a
        fused one); the consumer must read the rest."""
        if n < 2:
            return
        dropped = n // 2
        kept = torch.tensor([j for j in range(n) if j != dropped])
        cons = self.model.get_submodule(consumer)
        gated = fused or len(producers) > 1
        junction = Junction(
            producers[0], "gated" if gated else "producer", producers[0], consumer, batchnorm, n,
            producers=producers, fused=fused,
        )  # fmt: skip
        originals = {x: self.model.get_submodule(x) for x in junction.modules}
        seen: list[Tensor] = []
        error: Exception | None = None
        shapes: list[Any] = [t.shape for t in self.base.output]
        try:
            W_p = cons.weight.detach()[:, kept.to(cons.weight.device)]
            b_p = cons.bias.detach() if cons.bias is not None else None
            apply_reduction(self.model, junction, kept, W_p, b_p)
            handle = self.model.get_submodule(consumer).register_forward_pre_hook(
                lambda module, args: seen.append(args[0].detach().clone())
            )
            try:
                out, _ = self.forward()
                if self.scope is not None:
                    shapes = [t.shape for t in state_tensors(out)]
            except Exception as err:  # any failure is the answer
                error = err
            finally:
                handle.remove()
        finally:
            for x, m in originals.items():
                replace_module(self.model, x, m)
        names = " and ".join(repr(p) for p in producers)
        hint = (
            "the features are reshaped (into attention heads, say) or combined with another "
            "layer's output of the same width that the probe did not find as a gate/up partner "
            "(a gated product whose partner reads another input)"
        )
        if error is not None:
            raise JunctionError(
                f"the network fails with {names} narrowed to {n - 1} of {n} features "
                f"({type(error).__name__}: {error}); {hint}"
            ) from error
        expected = self.base.inputs[consumer][0].index_select(
            -1, kept.to(self.base.inputs[consumer][0].device)
        )
        if len(seen) != 1 or differs(seen[0], expected, self.tolerance):
            raise JunctionError(
                f"with {names} narrowed to {n - 1} of {n} features, {consumer!r} no longer "
                f"reads the same values in the remaining features (path: {list(path)}); {hint}"
            )
        if error is None and shapes != [t.shape for t in self.base.output]:
            raise _LeavesBlock(f"narrowing {names} changes the shape of the block's output")

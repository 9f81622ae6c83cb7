"""Saving and reloading reduced models with plain data only (``torch.load(weights_only=True)``).

A reduced model carries its *plan* (one record per eliminated junction: names, n, p and kept
indices) as JSON bytes in a ``uint8`` buffer named ``neuron_elimination_plan``. The plan is
therefore part of every ``state_dict`` and of every Lightning checkpoint written afterwards,
with no pickled code.

Loading a reduced ``state_dict`` needs the reduced *shapes* first. :func:`match_plan` gives a
model the shapes of a state dict's plan (it replays the records the model lacks with
:func:`rebuild_shapes`), and refuses with a
:class:`~lightning_neuronprune.errors.CheckpointMismatchError` (layer, both shapes, the call to
use) when the two disagree in a way that cannot be replayed, e.g. unreduced weights loaded into a
reduced model. It runs, before ``load_state_dict`` copies anything:

* from a ``load_state_dict`` pre-hook (:func:`install_plan_hook`) that every reduced model gets
  when its plan is written, and that ``NeuronEliminationCallback`` puts on the LightningModule in
  ``setup``, before the Trainer restores a ``ckpt_path``: ``trainer.fit/validate/test/predict(
  ckpt_path=...)`` need no change to the user's code;
* from :class:`ReducedCheckpointMixin`, the one line a LightningModule needs for
  ``MyModule.load_from_checkpoint(path)``, which builds a fresh instance outside any Trainer
  (PyTorch has no global ``load_state_dict`` hook, and a hook on an earlier instance does not
  reach the new one);
* from :func:`load_reduced`, which needs no change to the class at all.

A state dict without a plan meets a model without a plan exactly as before: nothing is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_neuronprune.errors import CheckpointMismatchError
from lightning_neuronprune.structure.conv import placeholder_fit
from lightning_neuronprune.structure.junction import Junction, get_linear
from lightning_neuronprune.structure.modules import replace_module
from lightning_neuronprune.structure.surgery import apply_reduction, update_config

__all__ = [
    "PLAN_BUFFER",
    "ReducedCheckpointMixin",
    "install_plan_hook",
    "load_reduced",
    "match_plan",
    "read_plan",
    "rebind_optimizer",
    "rebuild_shapes",
    "save_reduced",
    "write_plan",
]

PLAN_BUFFER = "neuron_elimination_plan"

M = TypeVar("M", bound=nn.Module)


def _encode(plan: list[dict[str, Any]]) -> Tensor:
    return torch.tensor(list(json.dumps(plan, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(buffer: Tensor) -> list[dict[str, Any]]:
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def write_plan(model: nn.Module, plan: list[dict[str, Any]]) -> None:
    """Store ``plan`` (plain dicts) in ``model``'s ``neuron_elimination_plan`` buffer.

    The model also gets the :func:`install_plan_hook` guard, so that loading a state dict of other
    shapes into it raises a :class:`~lightning_neuronprune.errors.CheckpointMismatchError`.
    """
    device = next((t.device for t in model.buffers()), None) or next(
        (t.device for t in model.parameters()), torch.device("cpu")
    )
    if PLAN_BUFFER in model._buffers:
        del model._buffers[PLAN_BUFFER]
    model.register_buffer(PLAN_BUFFER, _encode(plan).to(device))
    install_plan_hook(model)


def read_plan(source: nn.Module | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plan of a reduced model or ``state_dict`` (``[]`` if it was never reduced)."""
    if isinstance(source, nn.Module):
        buffer = source._buffers.get(PLAN_BUFFER)
        return _decode(buffer) if buffer is not None else []
    buffer = source.get(PLAN_BUFFER)
    return _decode(buffer) if isinstance(buffer, Tensor) else []


def save_reduced(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a reduced model's ``state_dict`` (weights and plan) to ``path``."""
    torch.save(model.state_dict(), path)


# ----------------------------------------------------------------- matching a state dict


def _describe(plan: list[Mapping[str, Any]]) -> str:
    if not plan:
        return "unreduced"
    return ", ".join(
        f"{rec['producer'] or rec['consumer'] + ':in'} keeps {rec['p']} of {rec['n']}"
        for rec in plan
    )


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, t in module._parameters.items():
        if t is not None:
            yield name, t
    for name, t in module._buffers.items():
        if t is not None and name not in module._non_persistent_buffers_set:
            yield name, t


def _first_mismatch(
    owner: nn.Module, state_dict: Mapping[str, Any], key_prefix: str,
    plans: tuple[list[Mapping[str, Any]], ...],
) -> str:  # fmt: skip
    """Where a planned layer's tensor differs in shape, e.g. ``layer 'net.2': `net.2.weight` is
    (7, 24) in the model and (16, 24) in the state dict`` (``""`` if none does)."""
    names = dict.fromkeys(name for plan in plans for rec in plan for name in _record_modules(rec))
    for name in names:
        try:
            module = owner.get_submodule(name)
        except AttributeError:
            continue
        for tname, t in _module_tensors(module):
            key = f"{key_prefix}{name}.{tname}"
            other = state_dict.get(key)
            if isinstance(other, Tensor) and other.shape != t.shape:
                return (
                    f"layer {name!r}: `{key}` is {tuple(t.shape)} in the model and "
                    f"{tuple(other.shape)} in the state dict"
                )
    return ""


def _mismatch(
    owner: nn.Module, rel: str, current: list[Mapping[str, Any]],
    incoming: list[Mapping[str, Any]], state_dict: Mapping[str, Any], key_prefix: str,
    advice: str | None,
) -> CheckpointMismatchError:  # fmt: skip
    what = type(owner).__name__ + (f" (submodule {rel!r})" if rel else "")
    shapes = _first_mismatch(owner, state_dict, key_prefix, (current, incoming))
    if not incoming:
        head = f"cannot load an unreduced state dict into a reduced {what} ({_describe(current)})"
        call = (
            "Load unreduced weights into a fresh, unreduced instance (`MyModule(**hparams)`, or "
            "`MyModule.load_from_checkpoint(path)`); to load the reduced model, use a checkpoint "
            "written after the reduction (`load_reduced(MyModule(**hparams), path)`, or "
            "`ckpt_path=` that checkpoint)."
        )
    else:
        head = (
            f"cannot load a state dict reduced as ({_describe(incoming)}) into a {what} reduced "
            f"as ({_describe(current)})"
        )
        call = (
            "Load it into a fresh, unreduced instance: `load_reduced(MyModule(**hparams), path)`, "
            "or `MyModule.load_from_checkpoint(path)` with `ReducedCheckpointMixin`."
        )
    return CheckpointMismatchError(
        head + (f": {shapes}" if shapes else "") + ". " + (advice if advice else call)
    )


def match_plan(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str = "",
    *,
    advice: str | None = None,
) -> list[str]:
    """Give ``model`` the reduced shapes of ``state_dict``, so that it loads; or refuse clearly.

    For ``model`` and each of its submodules that is reduced, or whose plan the state dict holds
    (key ``<prefix><submodule>.neuron_elimination_plan``), with ``current`` the module's plan and
    ``incoming`` the state dict's:

    * ``incoming == current`` (e.g. both unreduced): nothing to do;
    * ``current`` is the start of ``incoming`` (e.g. a fresh model and a reduced checkpoint): the
      records the module lacks are replayed (:func:`rebuild_shapes`
      with placeholder weights, which ``load_state_dict`` then overwrites) and the plan is written;
    * otherwise (e.g. unreduced weights into a reduced model): a
      :class:`~lightning_neuronprune.errors.CheckpointMismatchError`, with nothing changed.

    Args:
        model: the module about to load ``state_dict``.
        state_dict: the state dict (of ``model``'s parent too, with ``prefix``).
        prefix: the key prefix of ``model``'s entries in ``state_dict``.
        advice: what the error message tells the user to do instead (e.g. which checkpoint to
            pass); by default, the generic calls.

    Returns:
        The names of the submodules whose shapes were rebuilt (``""`` for ``model`` itself).

    Raises:
        CheckpointMismatchError: the plans disagree, the plan names a submodule or layer that
            ``model`` does not have, or it cannot be replayed on it. ``model`` is left unchanged.
    """
    owners: dict[str, nn.Module] = {
        name: m for name, m in model.named_modules() if PLAN_BUFFER in m._buffers
    }
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix) :]
        if rel != PLAN_BUFFER and not rel.endswith("." + PLAN_BUFFER):
            continue
        rel = rel[: -len(PLAN_BUFFER)].rstrip(".")
        if rel in owners:
            continue
        try:
            owners[rel] = model.get_submodule(rel) if rel else model
        except AttributeError as err:
            raise CheckpointMismatchError(
                f"the state dict holds a neuron elimination plan for submodule {rel!r} "
                f"(`{key}`), which {type(model).__name__} does not have"
            ) from err
    rebuilt: list[str] = []
    for rel, owner in sorted(owners.items()):
        key_prefix = prefix + (rel + "." if rel else "")
        current = read_plan(owner)
        buffer = state_dict.get(key_prefix + PLAN_BUFFER)
        incoming = _decode(buffer) if isinstance(buffer, Tensor) else []
        if incoming == current:
            continue
        if incoming[: len(current)] != current:
            raise _mismatch(owner, rel, current, incoming, state_dict, key_prefix, advice)
        missing = incoming[len(current) :]
        _replay(owner, rel, missing)
        write_plan(owner, incoming)
        update_config(owner, incoming)  # a Hugging Face config gets a uniform new FFN width
        rebuilt.append(rel)
    return rebuilt


def _junction(rec: Mapping[str, Any]) -> Junction:
    """The junction of a plan record (records written before gated junctions have no
    ``producers``)."""
    return Junction(
        target=rec["target"],
        kind=rec["kind"],
        producer=rec["producer"],
        consumer=rec["consumer"],
        batchnorm=rec["batchnorm"],
        num_features=rec["n"],
        producers=tuple(rec.get("producers") or ()),
        fused=bool(rec.get("fused", False)),
    )


def _record_modules(rec: Mapping[str, Any]) -> tuple[str, ...]:
    producers = rec.get("producers") or [rec["producer"]]
    return tuple(dict.fromkeys(filter(None, [*producers, rec["batchnorm"], rec["consumer"]])))


def rebuild_shapes(model: nn.Module, plan: list[Mapping[str, Any]]) -> None:
    """Give a fresh model the module shapes of a reduced one, so that its ``state_dict`` loads.

    The weights are placeholders (the producers' rows are kept; the consumer's weight is its
    first p columns) until ``load_state_dict`` fills them. Gated junctions (every producer, a
    fused ``gate_up_proj``'s two halves) replay like plain ones.

    Args:
        model: a fresh instance of the unreduced architecture.
        plan: the records of :func:`~lightning_neuronprune.search.elimination.eliminate_neurons`,
            as plain dicts (``model.neuron_elimination_plan``), applied in order.
    """
    for rec in plan:
        junction = _junction(rec)
        kept = torch.as_tensor(rec["kept"], dtype=torch.long)
        if junction.kind == "conv":  # placeholder shapes from the consumer's first columns
            fit = placeholder_fit(model, junction, kept, bias=rec.get("consumer_bias"))
            apply_reduction(model, junction, kept, *fit)
            continue
        cons = get_linear(model, junction.consumer)
        W_p = cons.weight.detach()[:, : kept.numel()]
        b_p = cons.bias.detach() if cons.bias is not None else None
        if rec.get("consumer_bias", b_p is not None) and b_p is None:
            b_p = cons.weight.new_zeros(cons.out_features)
        apply_reduction(model, junction, kept, W_p, b_p)


def _replay(owner: nn.Module, rel: str, records: list[dict[str, Any]]) -> None:
    """`rebuild_shapes`, undone if it fails half way."""
    originals: dict[str, nn.Module] = {}
    try:
        for rec in records:
            for name in _record_modules(rec):
                if name not in originals:
                    originals[name] = owner.get_submodule(name)
        rebuild_shapes(owner, records)
    except Exception as err:
        for name, module in originals.items():
            replace_module(owner, name, module)
        where = type(owner).__name__ + (f" (submodule {rel!r})" if rel else "")
        raise CheckpointMismatchError(
            f"cannot replay the saved neuron elimination plan ({_describe(records)}) on {where}: "
            f"{err}. Load it into a fresh instance of the architecture the plan was made on."
        ) from err


class _PlanHook:
    """``load_state_dict`` pre-hook running :func:`match_plan` (see :func:`install_plan_hook`)."""

    def __init__(self, advice: str | None = None) -> None:
        self.advice = advice

    def __call__(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
    ) -> None:
        match_plan(module, state_dict, prefix, advice=self.advice)


def install_plan_hook(model: nn.Module, *, advice: str | None = None) -> None:
    """Make ``model.load_state_dict`` run :func:`match_plan` first (idempotent).

    The hook lives on this instance (it survives ``copy.deepcopy`` and pickling, not a fresh
    ``MyModule()``); a second call only updates ``advice``.

    Args:
        model: the module to guard.
        advice: what mismatch errors tell the user to do (e.g. the reduced checkpoint to pass).
    """
    for wrapped in model._load_state_dict_pre_hooks.values():
        hook = getattr(wrapped, "hook", None)
        if isinstance(hook, _PlanHook):
            if advice is not None:
                hook.advice = advice
            return
    model.register_load_state_dict_pre_hook(_PlanHook(advice))


class ReducedCheckpointMixin:
    """One line on a LightningModule so that reduced checkpoints load everywhere.

    Put it first among the bases::

        class MyModule(ReducedCheckpointMixin, pl.LightningModule): ...

        model = MyModule.load_from_checkpoint("reduced.ckpt")   # shapes rebuilt from the plan

    ``load_state_dict`` (which ``load_from_checkpoint``, ``Trainer(...).fit/test(ckpt_path=...)``
    and user code call) first runs :func:`match_plan`: a reduced state dict rebuilds the reduced
    shapes of a fresh instance, a state dict without a plan loads exactly as before, and a
    mismatch raises :class:`~lightning_neuronprune.errors.CheckpointMismatchError` instead of
    PyTorch's ``size mismatch``.
    """

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        match_plan(self, state_dict)  # type: ignore[arg-type]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]


def load_reduced(
    model: M,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
) -> M:
    """Load a reduced model into ``model``, a fresh instance of the original architecture.

    Works for files from :func:`save_reduced` or ``torch.save(model.state_dict())``, for Lightning
    checkpoints written after the reduction (their ``"state_dict"`` entry is used), and for an
    in-memory ``state_dict``. Files are read with ``torch.load(weights_only=True)``. Needs no
    change to ``model``'s class (compare :class:`ReducedCheckpointMixin`).

    Args:
        model: a fresh, unreduced instance (e.g. ``MyLightningModule(**hparams)``); modified in
            place and returned.
        source: a path or a ``state_dict``.
        map_location: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.

    Returns:
        ``model``, with the reduced shapes and the saved weights.

    Raises:
        CheckpointMismatchError: the saved plan names layers that ``model`` does not have, or
            ``model`` is already reduced differently.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        state = torch.load(source, map_location=map_location, weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    match_plan(model, state)
    model.load_state_dict(state, strict=strict)
    return model


# ----------------------------------------------------------------- optimizers


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, before: Mapping[str, nn.Parameter], model: nn.Module
) -> list[str]:
    """Point ``optimizer`` at ``model``'s parameters after a reduction replaced some of them.

    A reduction swaps in new modules, so the optimizer still holds the old (unreduced) parameters
    and their state (e.g. Adam's moments), whose shapes no longer fit; a checkpoint of it could not
    be resumed. Each parameter that ``model`` now holds under a different object is replaced in
    its group at the same position, and its state is dropped: moments of ``W`` say nothing about
    ``W_p = W T``, so the reduced layers start their optimizer state afresh, as new parameters
    would. A parameter that is new (a consumer bias created by an affine fit) is inserted right
    after its module's weight, where ``model.parameters()`` lists it, and one that disappeared is
    removed. Other parameters keep their state and hyper-parameters.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) ``model``'s parameters.
        before: ``dict(model.named_parameters())`` taken before the reduction.
        model: the reduced model.

    Returns:
        The names of the parameters that were rebound (or added/removed).
    """
    after = dict(model.named_parameters())
    name_of = {id(p): name for name, p in before.items()}
    added = [name for name in after if name not in before]
    changed: list[str] = []
    for group in optimizer.param_groups:
        params: list[Tensor] = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None or after.get(name) is p:
                params.append(p)
                continue
            optimizer.state.pop(p, None)
            changed.append(name)
            new = after.get(name)
            if new is not None:
                params.append(new)
            for extra in added:  # e.g. `fc2.bias` after `fc2.weight`
                if extra.rpartition(".")[0] == name.rpartition(".")[0] and extra not in changed:
                    params.append(after[extra])
                    changed.append(extra)
        group["params"] = params
    return changed

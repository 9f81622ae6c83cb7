"""Reporting sweep results: logger scalars, the trade-off figure, text tables and JSON/CSV files."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_neuronprune.search.pareto import pareto_front, point_label
from lightning_neuronprune.search.sweep import SweepPoint

__all__ = [
    "PREFIX",
    "amend_report",
    "confirmation_table",
    "log_confirmations",
    "log_joint_scalars",
    "log_scalars",
    "log_summary",
    "mark_confirmations",
    "markdown_table",
    "point_label",
    "point_metrics",
    "report_result",
    "tradeoff_figure",
    "write_confirmation_csv",
    "write_report",
]

#: The namespace of every logged key.
PREFIX = "neuron_elimination"


def point_metrics(point: SweepPoint, prefix: str = PREFIX) -> dict[str, float]:
    """The scalars logged for one point, keyed ``<prefix>/<layer>/<name>``.

    Energies are in joules, memory in bits; ``accuracy`` is the sweep's metric.
    """
    e = point.energy
    values = {
        "p": point.p,
        "accuracy": point.accuracy,
        "accuracy_drop": point.accuracy_drop,
        "energy_total": e.total,
        "energy_mac": e.mac,
        "energy_sram_weights": e.sram_weights,
        "energy_sram_activations": e.sram_activations,
        "energy_dram": e.dram,
        "params": e.weights,
        "memory_params_bits": e.params_bits,
        "memory_total_bits": e.total_bits,
        "energy_ratio": point.energy_ratio,
        "memory_ratio": point.memory_ratio,
    }
    return {f"{prefix}/{point.layer}/{k}": float(v) for k, v in values.items()}


def log_scalars(loggers: Iterable[Any], points: Sequence[SweepPoint], prefix: str = PREFIX) -> None:
    """Log every point to every Lightning logger with ``step = p``.

    Points are logged by increasing p within each layer: TensorBoard treats a step lower than the
    previous one of the same tag as a restart and drops the earlier values. The unreduced
    baseline (p = n of the first layer) is also logged under ``<prefix>/baseline/...`` at step 0.
    """
    loggers = list(loggers)
    baseline = next((pt for pt in points if pt.p == pt.n), None)
    if baseline is not None:
        base = {
            k.replace(f"{prefix}/{baseline.layer}/", f"{prefix}/baseline/"): v
            for k, v in point_metrics(baseline, prefix).items()
        }
        for lg in loggers:
            lg.log_metrics(base, step=0)
    layers = list(dict.fromkeys(pt.layer for pt in points))
    for pt in sorted(points, key=lambda q: (layers.index(q.layer), q.p)):
        metrics = point_metrics(pt, prefix)
        for lg in loggers:
            lg.log_metrics(metrics, step=pt.p)
    for lg in loggers:
        lg.save()


def log_joint_scalars(loggers: Iterable[Any], points: Sequence[Any], prefix: str = PREFIX) -> None:
    """Log joint configurations under ``<prefix>/joint/...`` (step = evaluation index) and the
    joint Pareto front under ``<prefix>/joint_front/...`` (step = position by energy)."""
    loggers = list(loggers)
    names = ("accuracy", "accuracy_drop", "energy_total", "energy_ratio", "memory_ratio", "params")
    for tag, series in (("joint", points), ("joint_front", pareto_front(points))):
        for step, pt in enumerate(series):
            row = pt.as_dict()
            metrics = {f"{prefix}/{tag}/{k}": float(row[k]) for k in names}
            metrics.update({f"{prefix}/{tag}/p/{k}": float(v) for k, v in pt.config.items()})
            for lg in loggers:
                lg.log_metrics(metrics, step=step)
    for lg in loggers:
        lg.save()


def log_summary(
    loggers: Iterable[Any],
    points_by_layer: Mapping[str, Sequence[SweepPoint]],
    joint: Sequence[Any] = (),
    chosen: Any = None,
    prefix: str = PREFIX,
    *,
    confirmations: Sequence[Any] = (),
    extra_table: str = "",
) -> None:
    """Give loggers that take them (TensorBoard's ``experiment``) the trade-off figure
    (``<prefix>/tradeoff``, with held-out ``confirmations`` marked) and the table of
    configurations (``<prefix>/configurations``; with joint points, also the joint and
    single-layer Pareto front; then ``extra_table``)."""
    every = [pt for pts in points_by_layer.values() for pt in pts]
    table = markdown_table(every, chosen)
    if joint:
        front = pareto_front([*joint, *every])
        table += "\n**Pareto front, joint and single-layer:**\n\n" + markdown_table(front, chosen)
    if extra_table:
        table += "\n" + extra_table
    figure = None
    try:
        figure = tradeoff_figure(points_by_layer, chosen, joint=joint)
        if confirmations:
            search_base = next(iter(points_by_layer.values()))[0].accuracy
            mark_confirmations(figure, confirmations, search_base)
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: the trade-off figure is not logged", stacklevel=2
        )
    for lg in loggers:
        experiment = getattr(lg, "experiment", None)
        if figure is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure(f"{prefix}/tradeoff", figure, global_step=0, close=False)
        if hasattr(experiment, "add_text"):
            experiment.add_text(f"{prefix}/configurations", table, global_step=0)


def _fmt_energy(joules: float) -> str:
    for unit, scale in (("mJ", 1e-3), ("µJ", 1e-6), ("nJ", 1e-9)):
        if abs(joules) >= scale:
            return f"{joules / scale:.2f} {unit}"
    return f"{joules / 1e-12:.2f} pJ"


def markdown_table(points: Sequence[Any], chosen: Any = None) -> str:
    """A Markdown table of configurations, single-layer (:class:`SweepPoint`) or joint
    (:class:`~lightning_neuronprune.search.joint.JointPoint`); the chosen one is marked."""
    header = (
        "| configuration | strategy | accuracy | drop | energy | energy ratio | params "
        "| memory ratio | |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for pt in points:
        label = getattr(pt, "label", None) or f"{pt.layer}: p={pt.p}/{pt.n}"
        mark = "**chosen**" if chosen is not None and pt is chosen else ""
        rows.append(
            f"| {label} | {getattr(pt, 'strategy', 'single')} | {pt.accuracy:.4f} | "
            f"{pt.accuracy_drop:+.4f} | {_fmt_energy(pt.energy.total)} | {pt.energy_ratio:.2f}× | "
            f"{pt.energy.weights} | {pt.memory_ratio:.2f}× | {mark} |"
        )
    return header + "\n".join(rows) + "\n"


def tradeoff_figure(
    points_by_layer: Mapping[str, Sequence[SweepPoint]],
    chosen: Any = None,
    *,
    extra: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    joint: Sequence[Any] = (),
) -> Any:
    """Accuracy versus modelled energy, one curve per layer, with the Pareto front marked.

    Args:
        points_by_layer: ``{layer: points}``.
        chosen: a point to highlight.
        extra: more curves, ``{label: [(energy_joules, accuracy), ...]}``.
        joint: joint configurations (:class:`~lightning_neuronprune.search.joint.JointPoint`),
        drawn as
            points with their own Pareto front.

    Returns:
        A ``matplotlib.figure.Figure`` (requires the ``plot`` extra).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    every: list[SweepPoint] = []
    for layer, pts in points_by_layer.items():
        ordered = sorted(pts, key=lambda q: q.energy.total)
        ax.plot(
            [q.energy.total * 1e6 for q in ordered],
            [q.accuracy * 100 for q in ordered],
            marker="o",
            markersize=3,
            label=layer,
        )
        every.extend(pts)
    for label, curve in (extra or {}).items():
        ax.plot(
            [e * 1e6 for e, _ in curve], [a * 100 for _, a in curve], marker="s", ms=3, label=label
        )
    if joint:
        ax.scatter(
            [q.energy.total * 1e6 for q in joint], [q.accuracy * 100 for q in joint], s=8,
            color="0.6", label="joint configurations", zorder=2,
        )  # fmt: skip
        jfront = pareto_front([*joint, *every])
        ax.step(
            [q.energy.total * 1e6 for q in jfront], [q.accuracy * 100 for q in jfront],
            where="post", color="tab:red", linewidth=1.5, label="joint Pareto front",
        )  # fmt: skip
    front = pareto_front(every)
    if front:
        ax.step(
            [q.energy.total * 1e6 for q in front],
            [q.accuracy * 100 for q in front],
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front",
        )
    if chosen is not None:
        ax.scatter(
            [chosen.energy.total * 1e6], [chosen.accuracy * 100], s=120, facecolors="none",
            edgecolors="red", linewidths=2, zorder=5,
            label="chosen: " + (getattr(chosen, "label", None) or f"{chosen.layer} p={chosen.p}"),
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("modelled energy per inference (µJ, 45 nm)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Neuron elimination: accuracy vs energy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def mark_confirmations(fig: Any, confirmations: Sequence[Any], search_baseline: float) -> Any:
    """Mark the held-out confirmations on a :func:`tradeoff_figure`.

    Each re-measured candidate (a :class:`~lightning_neuronprune.search.confirmation.Confirmation`)
    is
    drawn at its search accuracy (open marker) and at ``search_baseline - confirmed_drop``, the
    accuracy its confirmed drop stands for on the search scale (filled: green star if the budget
    held there, red cross if not), joined by a vertical line: the gap is the selection bias.

    Args:
        fig: the figure (its first axes are used).
        confirmations: the re-measured candidates, in the order they were tried.
        search_baseline: the unreduced model's metric on the search part.

    Returns:
        ``fig``.
    """
    if not confirmations:
        return fig
    ax = fig.axes[0]
    for held, marker, color, label in (
        (True, "*", "tab:green", "confirmed on held-out data"),
        (False, "x", "tab:red", "failed the held-out confirmation"),
    ):
        sel = [c for c in confirmations if c.held is held]
        if not sel:
            continue
        x = [c.point.energy.total * 1e6 for c in sel]
        y_search = [c.point.accuracy * 100 for c in sel]
        y_conf = [(search_baseline - c.confirmed_drop) * 100 for c in sel]
        ax.vlines(x, y_search, y_conf, colors=color, linewidth=0.8, zorder=5)
        ax.scatter(x, y_search, s=30, facecolors="none", edgecolors=color, zorder=6)
        ax.scatter(x, y_conf, s=60 if held else 40, marker=marker, color=color, zorder=6,
                   label=label)  # fmt: skip
    ax.legend(fontsize=7)
    return fig


def write_report(
    directory: str | os.PathLike[str],
    points: Sequence[SweepPoint],
    chosen: SweepPoint | None,
    *,
    extra: Mapping[str, Any] | None = None,
    stem: str = "neuron_elimination",
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (every point with its kept indices, the choice, ``extra``) and
    ``<stem>.csv`` (one row per point) into ``directory``.

    Returns:
        The two paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    doc = {
        "points": [pt.as_dict(kept=True) for pt in points],
        "chosen": chosen.as_dict(kept=True) if chosen is not None else None,
        **(extra or {}),
    }
    json_path.write_text(json.dumps(doc, indent=2))
    rows = [pt.as_dict() for pt in points]
    with csv_path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return json_path, csv_path


def amend_report(path: str | os.PathLike[str], **keys: Any) -> None:
    """Set ``keys`` in the JSON report at ``path`` (e.g. a checkpoint written after it)."""
    path = Path(path)
    doc = json.loads(path.read_text())
    doc.update(keys)
    path.write_text(json.dumps(doc, indent=2))


def log_confirmations(
    loggers: Iterable[Any], confirmations: Sequence[Any], prefix: str = PREFIX
) -> None:
    """Search and held-out drops side by side under ``<prefix>/confirmation/...``, ``step`` = the
    order the candidates were tried in."""
    loggers = list(loggers)
    for i, c in enumerate(confirmations):
        values = {
            f"{prefix}/confirmation/search_drop": c.search_drop,
            f"{prefix}/confirmation/confirmed_drop": c.confirmed_drop,
            f"{prefix}/confirmation/held": float(c.held),
            **(
                {f"{prefix}/confirmation/upper_bound": c.upper_bound}
                if c.upper_bound is not None
                else {}
            ),
            f"{prefix}/confirmation/energy_ratio": c.point.energy_ratio,
        }
        for lg in loggers:
            lg.log_metrics(values, step=i)


def write_confirmation_csv(
    directory: str | os.PathLike[str],
    confirmations: Sequence[Any],
    stem: str = "neuron_elimination",
) -> Path:
    """``<stem>_confirmation.csv``: one row per re-measured candidate."""
    path = Path(directory) / f"{stem}_confirmation.csv"
    rows = [c.as_dict() for c in confirmations]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def confirmation_table(
    confirmations: Sequence[Any], fraction: float, budget: float, margin: float, confidence: Any,
    reserve: float = 0.0,
) -> str:  # fmt: skip
    """A Markdown table of the held-out confirmation: search and held-out drops, the result."""
    lines = [
        f"**Held-out confirmation** ({fraction:.0%} of the evaluation samples; budget "
        f"{budget:.4f}, reserve {reserve:.0%}, margin {margin:.4f}, confidence {confidence}):",
        "",
        "| configuration | search drop | held-out drop | upper bound | energy ratio | result |",
        "|---|---|---|---|---|---|",
    ]
    for c in confirmations:
        bound = "—" if c.upper_bound is None else f"{c.upper_bound:.4f}"
        lines.append(
            f"| {point_label(c.point)} | {c.search_drop:.4f} | {c.confirmed_drop:.4f} | {bound} | "
            f"{c.point.energy_ratio:.2f}× | {'confirmed' if c.held else 'rejected'} |"
        )
    return "\n".join(lines) + "\n"


def report_result(
    loggers: Sequence[Any],
    directory: str | os.PathLike[str],
    result: Any,
    *,
    write: bool,
    extra: Mapping[str, Any] | None = None,
    confirm: Any = None,
    budget: float = 0.0,
) -> tuple[Path, ...]:
    """Everything a finished search reports: scalars to ``loggers`` (each logger keeps rank
    zero's), and where ``write`` (rank zero) the summary text and figure, the JSON and CSV
    reports, and the confirmation CSV.

    Args:
        loggers: Lightning loggers.
        directory: where the files go.
        result: a :class:`~lightning_neuronprune.search.pipeline.SearchResult`.
        write: write the summary and the files (rank zero only).
        extra: more keys for the JSON report.
        confirm: the :class:`~lightning_neuronprune.search.pipeline.ConfirmSettings`, for the
            confirmation table.
        budget: the accuracy budget, for the confirmation table.

    Returns:
        The paths written (none unless ``write``).
    """
    every, joint, tried = result.every, result.joint_points, result.confirmations
    if loggers:
        log_scalars(loggers, every)
        if joint:
            log_joint_scalars(loggers, joint)
        log_confirmations(loggers, tried)
    if not write:
        return ()
    table = ""
    if tried and confirm is not None:
        table = confirmation_table(
            tried, confirm.fraction, budget, confirm.margin, confirm.confidence, confirm.reserve
        )
    chosen = result.decision.chosen
    log_summary(loggers, result.points, joint, chosen, confirmations=tried, extra_table=table)
    paths = write_report(
        directory, every, chosen,
        extra={
            "applied": dict(result.decision.plan),
            "joint": [pt.as_dict() for pt in joint],
            "joint_front": [pt.as_dict() for pt in pareto_front(joint)],
            "confirm_fraction": (confirm.fraction or None) if confirm is not None else None,
            "confirmation": [c.as_dict() for c in tried],
            **(extra or {}),
        },
    )  # fmt: skip
    if tried:
        paths = (*paths, write_confirmation_csv(directory, tried))
    return paths

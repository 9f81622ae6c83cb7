"""The markdown and JSON of ``reproduce_paper.py``: tables against the paper, energy checks."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from paper_data import (
    ARCH_LABELS,
    ENERGY_PARTS,
    METHOD_LABELS,
    PAPER_ENERGY,
    PAPER_ROWS,
    ArchResult,
    RowResult,
    smallest_within,
)
from report import machine_description, md_table


def energy_checks(results: list[ArchResult]) -> list[list[str]]:
    """Rows of the energy-ratio check: what DESIGN.md's rules give for the paper's two ratios."""
    out: list[list[str]] = []
    for ar in results:
        paper = PAPER_ENERGY[ar.arch]
        row = next((r for r in ar.rows if r.row.name == paper["ratio_row"]), None)
        if row is None:
            continue
        base = row.energy[row.n]
        paper_total = paper["total"] or sum(paper[k] for k in ENERGY_PARTS[:-1])
        ratio = f"{paper['ratio']:.2f}x"

        def line(label: str, value: float) -> None:
            out.append([ARCH_LABELS[ar.arch], label, f"{value:.2f}x", ratio])  # noqa: B023

        at_paper = _energy_of(ar, {row.row.target: row.paper_p})
        if at_paper is not None:
            line(
                f"{row.row.name} alone at the paper's p = {row.paper_p}",
                base.total / at_paper.total,
            )
            line(
                f"{row.row.name} alone at p = {row.paper_p}: paper's original total / reduced "
                "MAC energy only",
                paper_total / at_paper.mac,
            )
            mac = round(at_paper.mac * 1e6, 2)
            line(
                f"the same with the MAC energy rounded as the paper prints it ({mac:.2f} µJ)",
                paper_total * 1e6 / mac,
            )
        if row.chosen is not None:
            line(
                f"{row.row.name} alone at our chosen p = {row.chosen}",
                base.total / row.energy[row.chosen].total,
            )
        combos = [ar.rows[:k] for k in range(2, len(ar.rows) + 1)]
        for combo in combos:
            rep = _energy_of(ar, {r.row.target: r.paper_p for r in combo})
            if rep is not None:
                label = " + ".join(
                    f"{r.row.name.rsplit('-', 1)[-1]} at p = {r.paper_p}" for r in combo
                )
                line(f"{label}, reduced together (paper's p)", base.total / rep.total)
    return out


def _energy_of(ar: ArchResult, targets: dict[str, int]) -> Any:
    """Energy of the network reduced at one or several targets at once (weights do not matter)."""
    from lightning_neuronprune import EnergyModel, eliminate_neurons

    try:
        reduced = eliminate_neurons(
            ar.model,
            dict(targets),
            stats=ar.stats,
            kept={t: list(range(p)) for t, p in targets.items()},
        ).model
    except Exception as err:  # a combination the surgery refuses is skipped
        print(f"energy check skipped for {targets}: {err}", file=sys.stderr)
        return None
    return EnergyModel().estimate(reduced, torch.zeros(1, 1, 28, 28))


def _band(rr: RowResult) -> tuple[int, int]:
    """The p range around the chosen point used for the mean accuracy of each method."""
    p = rr.chosen if rr.chosen is not None else rr.paper_p
    return max(1, p // 2), 2 * p


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _uj(x: float) -> str:
    return f"{x * 1e6:.2f}"


def _nj(x: float) -> str:
    return f"{x * 1e9:.2f}"


def render(
    results: list[ArchResult],
    checks: list[list],
    args: argparse.Namespace,
    wall: float,
    image_links: dict[str, str],
) -> str:
    parts: list[str] = []
    cmd = "python benchmarks/reproduce_paper.py " + " ".join(sys.argv[1:])
    quick = ", quick mode: NOT the reference numbers" if args.quick else ""
    parts.append(
        f"### Reproduction run\n\nMachine: {machine_description()}. Command: `{cmd.strip()}` "
        f"(wall time {wall / 60:.1f} min{quick}). "
        f"Statistics on {results[0].samples if results else 0} training images, evaluation on "
        f"{args.eval_size or 10000} test images; no retraining anywhere."
    )

    rows = []
    for ar in results:
        rows.append(
            [
                ARCH_LABELS[ar.arch],
                _pct(ar.test_acc),
                f"{next(r.acc_before for r in PAPER_ROWS if r.arch == ar.arch):.2f}",
                "cached" if ar.train_seconds is None else f"{ar.train_seconds:.0f}",
                f"{ar.stats_seconds:.1f}",
            ]
        )
    parts.append(
        "#### Trained networks\n\nLightning, Adam with a cosine schedule, batch 128, on the first "
        "55000 training images (`benchmarks/common.py`).\n\n"
        + md_table(
            ["network", "test top-1 (ours) %", "paper %", "training s", "statistics s"], rows
        )
    )

    mem_rows = []
    for ar in results:
        for rr in ar.rows:
            e0 = rr.energy[rr.n]
            p = rr.chosen
            e1 = rr.energy.get(p) if p is not None else None
            mem_rows.append(
                [
                    rr.row.name,
                    f"`{rr.row.target}`",
                    f"{rr.n} → {p if p is not None else '—'}",
                    f"{rr.paper_p} ({100 * rr.paper_weights / e0.weights:.2f} %, "
                    f"{e0.weights / rr.paper_weights:.2f}x)",
                    f"{e0.weights:,}",
                    f"{e1.weights:,}" if e1 else "—",
                    f"{e0.weights + e0.activations:,}",
                    f"{e1.weights + e1.activations:,}" if e1 else "—",
                    f"{100 * e1.weights / e0.weights:.2f} ({rr.row.memory_after:.2f})"
                    if e1
                    else "—",
                    f"{e0.weights / e1.weights:.2f}x ({rr.row.memory_ratio:.2f}x)" if e1 else "—",
                    f"{_pct(rr.base_acc)} ({rr.row.acc_before:.2f})",
                    f"{_pct(rr.curves['svd_qr'].get(p) if p else None)} ({rr.row.acc_after:.2f})",
                    _pct(rr.threshold),
                ]
            )
    parts.append(
        "#### Memory table (paper's Table, single-layer reductions)\n\n"
        "Ours first, the paper's figure in parentheses. `p` is the smallest number of kept "
        "features whose accuracy is at least our baseline minus the paper's drop for that row "
        '(`threshold`), with the paper\'s method (`svd_qr`, affine=False, ridge=0). "paper p" is '
        "the p implied by the paper's memory column, with the % and ratio that this p gives by "
        "our count. Params count 32-bit weights (biases excluded, as in the paper); "
        '"total" adds the activations.\n\n'
        + md_table(
            [
                "layer",
                "target",
                "n → p",
                "paper p",
                "params before",
                "params after",
                "total before",
                "total after",
                "% of original",
                "ratio",
                "acc before %",
                "acc after %",
                "threshold %",
            ],
            mem_rows,
        )
    )

    spec_rows = []
    for ar in results:
        for rr in ar.rows:
            spec_rows.append(
                [
                    rr.row.name,
                    rr.n,
                    rr.rank,
                    *(rr.energy_share[q] for q in sorted(rr.energy_share)),
                    rr.chosen if rr.chosen is not None else "—",
                    rr.paper_p,
                ]
            )
    parts.append(
        "#### Spectrum of each junction's input X (training statistics)\n\n"
        "How many leading singular values of X hold 90 / 99 / 99.9 % of Σσ² (uncentred, as in "
        "the paper's SVD), beside our chosen p and the paper's p.\n\n"
        + md_table(
            [
                "layer",
                "n",
                "rank(X)",
                "p for 90 %",
                "p for 99 %",
                "p for 99.9 %",
                "our p",
                "paper p",
            ],
            spec_rows,
        )
    )

    en_rows = []
    for ar in results:
        paper = PAPER_ENERGY[ar.arch]
        if not ar.rows:
            continue
        e0 = ar.rows[0].energy[ar.rows[0].n]
        paper_total = paper["total"] or sum(paper[k] for k in ENERGY_PARTS[:-1])
        en_rows.append(
            [
                f"{ARCH_LABELS[ar.arch]} original (paper)",
                _uj(paper["mac"]),
                _uj(paper["sram_weights"]),
                _nj(paper["sram_activations"]),
                _uj(paper["dram"]),
                _uj(paper_total) + ("" if paper["total"] else " (sum)"),
                "",
                "",
            ]
        )
        en_rows.append(
            [
                f"{ARCH_LABELS[ar.arch]} original (ours)",
                _uj(e0.mac),
                _uj(e0.sram_weights),
                _nj(e0.sram_activations),
                _uj(e0.dram),
                _uj(e0.total),
                "1.00x",
                _pct(ar.rows[0].base_acc),
            ]
        )
        for rr in ar.rows:
            if rr.chosen is None:
                continue
            e1 = rr.energy[rr.chosen]
            r = e0.ratio(e1)
            paper_ratio = (
                f" (paper {paper['ratio']:.2f}x at {paper['ratio_acc']:.2f}%)"
                if rr.row.name == paper["ratio_row"]
                else ""
            )
            en_rows.append(
                [
                    f"{rr.row.name}, p = {rr.chosen}",
                    f"{_uj(e1.mac)} ({r['mac']:.2f}x)",
                    f"{_uj(e1.sram_weights)} ({r['sram_weights']:.2f}x)",
                    f"{_nj(e1.sram_activations)} ({r['sram_activations']:.2f}x)",
                    f"{_uj(e1.dram)} ({r['dram']:.2f}x)",
                    f"{_uj(e1.total)}",
                    f"{r['total']:.2f}x{paper_ratio}",
                    _pct(rr.curves["svd_qr"][rr.chosen]),
                ]
            )
    parts.append(
        "#### Energy table (45 nm model of DESIGN.md, per inference)\n\n"
        "Original/after ratios in parentheses.\n\n"
        + md_table(
            [
                "configuration",
                "MAC µJ",
                "SRAM weights µJ",
                "SRAM activations nJ",
                "DRAM µJ",
                "total µJ",
                "energy ratio",
                "accuracy %",
            ],
            en_rows,
        )
    )
    if checks:
        parts.append(
            "#### The paper's two energy ratios, checked against DESIGN.md's rules\n\n"
            "Each line computes an energy ratio (original total / reduced total unless stated) "
            "for a configuration, with the same energy model.\n\n"
            + md_table(["network", "configuration", "ratio by the rules", "paper"], checks)
        )

    base_rows = []
    for ar in results:
        for rr in ar.rows:
            e0 = rr.energy[rr.n]
            lo, hi = _band(rr)
            variants = [(label, rr.curves[key], key) for key, label in METHOD_LABELS.items()]
            variants += [
                (f"svd_qr kept set, ridge={lam:g}", acc, "") for lam, acc in rr.ridge_curves.items()
            ]
            for label, acc, key in variants:
                pmin = smallest_within(acc, rr.threshold)
                spread = ""
                if key == "random_ls" and rr.chosen is not None and len(rr.random_runs) > 1:
                    vals = torch.tensor([r[rr.chosen] for r in rr.random_runs])
                    spread = f" ± {100 * vals.std().item():.2f}"
                band = [a for p, a in acc.items() if lo <= p <= hi and not math.isnan(a)]
                base_rows.append(
                    [
                        rr.row.name,
                        label,
                        (_pct(acc.get(rr.chosen)) + spread) if rr.chosen else "—",
                        _pct(acc.get(rr.paper_p)) if rr.paper_p in acc else "—",
                        _pct(sum(band) / len(band)) if band else "—",
                        pmin if pmin is not None else f"> {max(rr.grid)}",
                        f"{e0.weights / rr.energy[pmin].weights:.2f}x"
                        if pmin in rr.energy
                        else "—",
                        f"{e0.total / rr.energy[pmin].total:.2f}x" if pmin in rr.energy else "—",
                    ]
                )
    parts.append(
        "#### Baselines and variants at the same p (no retraining)\n\n"
        '"acc at p" is the accuracy at the row\'s chosen p (svd_qr\'s); "acc at paper p" at the p '
        'implied by the paper\'s memory column (when on the grid); "mean acc" averages the '
        "accuracy over every grid p from half to twice the chosen p (less noisy than one point); "
        '"smallest p" is the smallest grid p whose accuracy stays within the paper\'s drop, with '
        "its memory and energy ratios.\n\n"
        + md_table(
            [
                "layer",
                "method",
                "acc at p %",
                "acc at paper p %",
                "mean acc, p/2..2p %",
                "smallest p",
                "memory ratio",
                "energy ratio",
            ],
            base_rows,
        )
    )

    check_rows = []
    for ar in results:
        for rr in ar.rows:
            if rr.check:
                c = rr.check
                check_rows.append(
                    [
                        rr.row.name,
                        rr.chosen,
                        _pct(c["accuracy_sweep"]),
                        _pct(c["accuracy_full_forward"]),
                        f"{c['weights_model']:,}",
                        f"{c['energy_sweep'] * 1e6:.3f} / {c['energy_model'] * 1e6:.3f}",
                        "same" if rr.alg1 == rr.chosen else f"stops at {rr.alg1}",
                    ]
                )
    if check_rows:
        parts.append(
            "#### Cross-checks\n\nThe chosen configuration rebuilt as a real reduced model with "
            "`eliminate_neurons(..., kept=...)` and evaluated by a full forward pass; energy from "
            "the sweep vs the rebuilt model; and whether Algorithm 1's stopping rule (stop at the "
            "first p, going down, whose drop exceeds the budget) gives the same point.\n\n"
            + md_table(
                [
                    "layer",
                    "p",
                    "acc (cached sweep) %",
                    "acc (full forward) %",
                    "weights",
                    "energy µJ sweep / model",
                    "Algorithm 1 stop",
                ],
                check_rows,
            )
        )
    if image_links:
        parts.append(
            "#### Figures\n\n"
            + "\n\n".join(f"![{alt}]({link})" for alt, link in image_links.items())
        )
    return "\n\n".join(parts)


def to_json(results: list[ArchResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ar in results:
        out[ar.arch] = {
            "test_accuracy": ar.test_acc,
            "rows": {
                rr.row.name: {
                    "target": rr.row.target,
                    "n": rr.n,
                    "rank": rr.rank,
                    "chosen": rr.chosen,
                    "paper_p": rr.paper_p,
                    "baseline": rr.base_acc,
                    "threshold": rr.threshold,
                    "curves": {k: {str(p): a for p, a in v.items()} for k, v in rr.curves.items()},
                    "ridge": {
                        str(k): {str(p): a for p, a in v.items()}
                        for k, v in rr.ridge_curves.items()
                    },
                    "energy_total": {str(p): e.total for p, e in rr.energy.items()},
                    "energy_share": {str(k): v for k, v in rr.energy_share.items()},
                    "check": rr.check,
                    "seconds": rr.seconds,
                }
                for rr in ar.rows
            },
        }
    return out

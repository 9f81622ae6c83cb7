"""The figures of ``reproduce_paper.py``: accuracy against kept features and energy."""

from __future__ import annotations

import math
from pathlib import Path

from paper_data import ARCH_LABELS, METHOD_LABELS, ArchResult


def plot(results: list[ArchResult], images: Path, rel: str) -> dict[str, str]:
    """Accuracy vs p for every method (one panel per row) and accuracy vs energy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    links: dict[str, str] = {}
    all_rows = [rr for ar in results for rr in ar.rows]
    if not all_rows:
        return links
    cols = 3
    nrows = math.ceil(len(all_rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    styles = {
        "svd_qr": ("C0", "-", 2.0),
        "qr": ("C1", "--", 1.5),
        "svd_qr_affine": ("C2", "-", 1.2),
        "qr_affine": ("C3", ":", 1.5),
        "magnitude": ("C7", "-", 1.2),
        "magnitude_ls": ("C4", "-.", 1.2),
        "random_ls": ("C5", "-", 1.0),
    }
    for ax, rr in zip(axes.flat, all_rows, strict=False):
        for key, label in METHOD_LABELS.items():
            acc = rr.curves[key]
            ps = sorted(p for p in acc if not math.isnan(acc[p]))
            color, ls, lw = styles[key]
            ax.plot(ps, [100 * acc[p] for p in ps], color=color, ls=ls, lw=lw, label=label)
        ax.axhline(
            100 * rr.threshold, color="k", lw=0.8, ls=":", label="our baseline − paper's drop"
        )
        if rr.chosen is not None:
            ax.axvline(rr.chosen, color="C0", lw=0.8, ls=":")
        ax.axvline(rr.paper_p, color="k", lw=0.8, ls="--", label="paper's p")
        ax.set_xscale("log")
        ax.set_ylim(max(0, 100 * rr.base_acc - 25), 100 * rr.base_acc + 1)
        ax.set_title(f"{rr.row.name} ({rr.layer}, n={rr.n})")
        ax.set_xlabel("kept features p")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(all_rows) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(images / "accuracy_vs_p.png", dpi=110)
    plt.close(fig)
    links["accuracy versus kept features p, every method"] = f"{rel}/accuracy_vs_p.png"

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, ar in zip(axes.flat, results, strict=False):
        for i, rr in enumerate(ar.rows):
            acc = rr.curves["svd_qr"]
            ps = sorted(acc)
            ax.plot(
                [rr.energy[p].total * 1e6 for p in ps],
                [100 * acc[p] for p in ps],
                color=f"C{i}",
                marker=".",
                ms=3,
                lw=1.2,
                label=rr.row.name,
            )
            if rr.chosen is not None:
                e = rr.energy[rr.chosen].total * 1e6
                ax.plot([e], [100 * acc[rr.chosen]], color=f"C{i}", marker="o", ms=8, mfc="none")
            if rr.paper_p in rr.energy:
                ax.plot(
                    [rr.energy[rr.paper_p].total * 1e6],
                    [rr.row.acc_after],
                    color=f"C{i}",
                    marker="*",
                    ms=11,
                    ls="none",
                )
        e0 = ar.rows[0].energy[ar.rows[0].n]
        ax.plot([e0.total * 1e6], [100 * ar.rows[0].base_acc], "ks", label="original")
        ax.set_xscale("log")
        ax.set_ylim(max(0, 100 * ar.rows[0].base_acc - 20), 100 * ar.rows[0].base_acc + 1)
        ax.set_title(f"{ARCH_LABELS[ar.arch]}: svd_qr sweeps (o: chosen, *: paper)")
        ax.set_xlabel("modelled energy per inference, µJ")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(images / "accuracy_vs_energy.png", dpi=110)
    plt.close(fig)
    links["accuracy versus energy per layer (paper's figure)"] = f"{rel}/accuracy_vs_energy.png"
    return links

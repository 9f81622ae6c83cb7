"""Reproduce the MNIST tables of Zhang, Davoodi & Hu (2018) and compare with pruning baselines.

For each row of the paper's memory table (LeNet300-100-FC1/FC2/FC3, LeNet5-FC1/FC2; the paper's
"FCk" is our target ``net.fck:in``), with networks trained by Lightning on MNIST
(``benchmarks/common.trained``, cached in ``benchmarks/.cache``):

* statistics ``G = X Xᵀ`` of the junction on the 60000 training images (``collect_statistics``);
* rank sweeps evaluated on the 10000 test images (``CachedEvaluator`` + ``sweep_junction``) for the
  paper's Algorithm 2 (``svd_qr``), the nested ``qr`` method and the affine variants;
* baselines at the same p, none retrained: magnitude selection (L2 norm of the consumer's weight
  columns) without and with the least-squares update, random selection with the update (mean of 5
  seeds), and the paper's selection with a ridge-regularised update;
* the "after" point chosen as the paper's was: the smallest p whose accuracy is at least our
  baseline accuracy minus the paper's own drop for that row;
* the paper's memory and energy columns beside ours, and a check of its two energy ratios.

The results go to ``<out-dir>/RESULTS.md`` (between generated-section markers; text outside them is
kept) and the figures to ``<out-dir>/images``. Examples::

    python benchmarks/reproduce_paper.py --data-dir ../shared/data/mnist   # docs/RESULTS.md
    python benchmarks/reproduce_paper.py --quick --out-dir /tmp/quick       # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_data import (  # noqa: E402
    ARCH_LABELS,
    PAPER_ROWS,
    RIDGES,
    ArchResult,
    PaperRow,
    RowResult,
    algorithm1_stop,
    initial_grid,
    numerical_rank,
    smallest_within,
)
from paper_methods import compare_methods  # noqa: E402
from paper_plots import plot  # noqa: E402
from paper_report import energy_checks, render, to_json  # noqa: E402
from report import machine_description, write_section  # noqa: E402

# --------------------------------------------------------------------------------------------
# evaluation helpers


def energy_share(stats: Any, shares: Sequence[float] = (0.9, 0.99, 0.999)) -> dict[float, int]:
    """The number of leading singular values of X holding each share of ``Σ σ²``."""
    from lightning_neuronprune.core.selection import spectrum

    sigma2 = spectrum(stats)[0].clamp_min(0)
    cum = torch.cumsum(sigma2, 0) / sigma2.sum()
    return {
        q: int(torch.searchsorted(cum, torch.tensor(q, dtype=cum.dtype)).item()) + 1 for q in shares
    }


class KeptEvaluator:
    """Accuracy of the network when the junction keeps ``kept`` (own loop, for the baselines).

    The consumer is replaced by a ``GatheredLinear`` probe on the cached evaluator, exactly as
    ``sweep_junction`` does, with weights from the least-squares update (``update=True``) or the
    consumer's own columns ``W[:, kept]`` (``update=False``, plain deletion).
    """

    def __init__(self, model: nn.Module, junction: Any, stats: Any, evaluator: Any) -> None:
        self.consumer = model.get_submodule(junction.consumer)
        self.stats = stats
        self.evaluator = evaluator

    def __call__(
        self, kept: Tensor, *, update: bool = True, affine: bool = False, ridge: float = 0.0
    ) -> float:
        from lightning_neuronprune import (
            GatheredLinear,
            least_squares_transform,
            reconstruct_consumer,
        )

        kept = torch.sort(kept.to(torch.long)).values
        W, b = self.consumer.weight.detach(), self.consumer.bias
        if update:
            rec = least_squares_transform(self.stats, kept, affine=affine, ridge=ridge)
            W_p, b_p = reconstruct_consumer(W, b, rec)
        else:
            W_p = W[:, kept.to(W.device)]
            b_p = b.detach() if b is not None else None
        probe = GatheredLinear(kept.to(W.device), W.shape[0], bias=b_p is not None).to(W)
        with torch.no_grad():
            probe.weight.copy_(W_p)
            if b_p is not None:
                probe.bias.copy_(b_p)
        return self.evaluator(probe)


def _params_after(junction: Any, model: nn.Module, base_weights: int, p: int) -> int:
    """Weights of the network after keeping p of the junction's n features (analytic count)."""
    consumer = model.get_submodule(junction.consumer)
    per_feature = consumer.out_features
    if junction.producer is not None:
        per_feature += model.get_submodule(junction.producer).in_features
    return base_weights - (junction.num_features - p) * per_feature


def paper_p(row: PaperRow, junction: Any, model: nn.Module, base_weights: int) -> int:
    """The p that the paper's memory column implies (closest % of the original parameters)."""
    return min(
        range(1, junction.num_features + 1),
        key=lambda p: abs(
            100 * _params_after(junction, model, base_weights, p) / base_weights - row.memory_after
        ),
    )


# --------------------------------------------------------------------------------------------
# the experiment


def run_row(
    row: PaperRow,
    model: nn.Module,
    stats_all: dict[str, Any],
    eval_loader: Any,
    example: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> RowResult:
    from common import accuracy
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_neuronprune import EnergyModel, eliminate_neurons, find_junction
    from lightning_neuronprune.search.evaluation import CachedEvaluator
    from lightning_neuronprune.search.sweep import sweep_junction

    started = time.perf_counter()
    junction = find_junction(model, row.target)
    stats = stats_all[junction.consumer]
    n = junction.num_features
    evaluator = CachedEvaluator(
        model, junction.consumer, eval_loader, MulticlassAccuracy(num_classes=10, average="micro")
    )
    energy_model = EnergyModel()
    base_energy = energy_model.estimate(model, example)
    base_acc = evaluator()
    baseline = (base_acc, base_energy)
    threshold = base_acc - row.allowed_drop
    rank = numerical_rank(stats)

    def sweep(ranks: list[int], **options: Any) -> list[Any]:
        pts = sweep_junction(
            model,
            junction,
            stats,
            evaluator,
            energy_model,
            example,
            ranks=ranks,
            baseline=baseline,
            **options,
        )
        return [pt for pt in pts if pt.p < n or pt.kept != tuple(range(n))]

    grid = initial_grid(rank, args.quick)
    svd_points = {pt.p: pt for pt in sweep(grid, method="svd_qr")}
    acc_svd = {p: pt.accuracy for p, pt in svd_points.items()}
    chosen = smallest_within(acc_svd, threshold)
    if chosen is not None and not args.quick:  # make the grid dense below the chosen point
        lower = max([p for p in svd_points if p < chosen], default=0)
        extra = list(range(chosen - 1, lower, -1))
        if extra:
            svd_points.update({pt.p: pt for pt in sweep(extra, method="svd_qr")})
            acc_svd = {p: pt.accuracy for p, pt in svd_points.items()}
            chosen = smallest_within(acc_svd, threshold)
    grid = sorted(svd_points, reverse=True)
    log(f"  {row.name}: n={n}, rank={rank}, {len(grid)} grid points, chosen p={chosen}")

    curves: dict[str, dict[int, float]] = {"svd_qr": acc_svd}
    for key, options in (
        ("qr", {"method": "qr"}),
        ("svd_qr_affine", {"method": "svd_qr", "affine": True}),
        ("qr_affine", {"method": "qr", "affine": True}),
    ):
        pts = {pt.p: pt.accuracy for pt in sweep(grid, **options)}
        curves[key] = {p: pts.get(p, math.nan) for p in grid}

    evaluate = KeptEvaluator(model, junction, stats, evaluator)
    consumer = model.get_submodule(junction.consumer)
    norms = consumer.weight.detach().double().norm(dim=0)
    order_mag = torch.argsort(-norms, stable=True)
    curves["magnitude"] = {p: evaluate(order_mag[:p], update=False) for p in grid}
    curves["magnitude_ls"] = {p: evaluate(order_mag[:p]) for p in grid}
    random_runs = []
    for seed in range(args.seeds):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        random_runs.append({p: evaluate(perm[:p]) for p in grid})
    curves["random_ls"] = {p: sum(r[p] for r in random_runs) / len(random_runs) for p in grid}
    kept_svd = {p: pt.kept for p, pt in svd_points.items()}
    ridge_curves = {
        lam: {p: evaluate(torch.tensor(kept_svd[p]), ridge=lam) for p in grid} for lam in RIDGES
    }

    energy = {p: pt.energy for p, pt in svd_points.items()}
    energy[n] = base_energy
    base_weights = base_energy.weights
    result = RowResult(
        row=row,
        n=n,
        rank=rank,
        layer=junction.layer,
        base_acc=base_acc,
        threshold=threshold,
        grid=grid,
        curves=curves,
        random_runs=random_runs,
        ridge_curves=ridge_curves,
        energy=energy,
        kept_svd=kept_svd,
        chosen=chosen,
        alg1=algorithm1_stop(acc_svd, threshold),
        paper_p=(pp := paper_p(row, junction, model, base_weights)),
        paper_weights=_params_after(junction, model, base_weights, pp),
        energy_share=energy_share(stats),
    )
    # Cross-check the chosen point on a real reduced model (eliminate_neurons, full forward).
    if chosen is not None:
        reduced = eliminate_neurons(
            model, {row.target: chosen}, stats=stats_all, kept={row.target: kept_svd[chosen]}
        ).model
        rep = energy_model.estimate(reduced, example)
        result.check = {
            "accuracy_full_forward": accuracy(reduced, x_test, y_test),
            "accuracy_sweep": acc_svd[chosen],
            "weights_model": rep.weights,
            "weights_formula": _params_after(junction, model, base_weights, chosen),
            "energy_model": rep.total,
            "energy_sweep": energy[chosen].total,
        }
        if rep.weights != result.check["weights_formula"]:
            raise RuntimeError(f"weight count mismatch for {row.name}: {result.check}")
    result.seconds = time.perf_counter() - started
    return result


def run_arch(
    arch: str,
    rows: Sequence[PaperRow],
    data: dict[str, Any],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> ArchResult:
    from common import CACHE, RECIPES, accuracy, loader, trained

    from lightning_neuronprune import collect_statistics, find_junction

    epochs = 1 if args.quick else args.epochs
    limit = args.limit_train if args.limit_train else (2000 if args.quick else None)
    tag = f"{arch}-e{epochs or RECIPES[arch][0]}-n{limit or 'all'}-s0"
    cached = not args.quick and (CACHE / f"{tag}.pt").exists()
    torch.set_num_threads(args.default_threads)  # training: torch's default
    t0 = time.perf_counter()
    lit = trained(arch, args.data_dir, epochs=epochs, limit_train=limit, cache=not args.quick)
    train_seconds = None if cached else time.perf_counter() - t0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = lit.eval()
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    if args.eval_size:
        x_test, y_test = x_test[: args.eval_size], y_test[: args.eval_size]
    test_acc = accuracy(model, x_test, y_test)
    log(f"{arch}: test accuracy {100 * test_acc:.2f}% ({tag}, cached={cached})")

    consumers = sorted({find_junction(model, r.target).consumer for r in rows})
    t0 = time.perf_counter()
    samples = min(args.stats_samples, len(x_train))
    stats_all = collect_statistics(model, consumers, loader(x_train, y_train), max_samples=samples)
    stats_seconds = time.perf_counter() - t0
    log(f"{arch}: statistics of {consumers} on {samples} images in {stats_seconds:.1f}s")
    eval_loader = loader(x_test, y_test)
    example = x_test[:1]
    results = [
        run_row(r, model, stats_all, eval_loader, example, x_test, y_test, args, log) for r in rows
    ]
    return ArchResult(
        arch, test_acc, train_seconds, stats_seconds, samples, results, model, stats_all
    )


# --------------------------------------------------------------------------------------------
# energy-ratio check


# --------------------------------------------------------------------------------------------
# reporting


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from common import DEFAULT_MNIST

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=DEFAULT_MNIST, help="directory of the MNIST IDX files"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="RESULTS.md and images/ go here (default: docs; --quick: benchmarks/.cache/quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: 1 epoch on 2000 images, few ranks, small sets",
    )
    parser.add_argument("--rows", nargs="+", default=None, choices=[r.name for r in PAPER_ROWS])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default recipe)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--stats-samples", type=int, default=None, help="default 60000")
    parser.add_argument("--eval-size", type=int, default=None, help="test images (default 10000)")
    parser.add_argument("--seeds", type=int, default=None, help="random-selection seeds (5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for statistics and sweeps (default 1: the sweeps are many "
        "small sequential ops, which extra threads slow down on a busy machine; 0 keeps torch's "
        "default). Training, when a network is not cached, uses torch's default.",
    )
    parser.add_argument("--json", type=Path, default=None, help="also dump the curves as JSON")
    parser.add_argument(
        "--compare-methods", action="store_true",
        help="only compare the selection methods svd_qr, qr and output at every p of each row "
        "(writes the section reproduce_paper_methods)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = REPO / ("benchmarks/.cache/quick" if args.quick else "docs")
    if args.stats_samples is None:
        args.stats_samples = 3000 if args.quick else 60_000
    if args.eval_size is None:
        args.eval_size = 2000 if args.quick else 0
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    return args


def main(argv: Sequence[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args(argv)
    args.default_threads = torch.get_num_threads()
    from common import mnist_tensors

    from lightning_neuronprune import collect_statistics  # noqa: F401 - fail early if missing

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    log(machine_description())
    data = mnist_tensors(args.data_dir)
    if args.compare_methods:
        body = compare_methods(data, args, log)
        write_section(
            args.out_dir / "RESULTS.md", "reproduce_paper_methods", body, "reproduce_paper.py"
        )
        print(body)
        return
    rows = [r for r in PAPER_ROWS if args.rows is None or r.name in args.rows]
    results = []
    for arch in ARCH_LABELS:
        arch_rows = [r for r in rows if r.arch == arch]
        if arch_rows:
            results.append(run_arch(arch, arch_rows, data, args, log))
    checks = energy_checks(results)
    wall = time.perf_counter() - started
    links = plot(results, args.out_dir / "images", "images")
    body = render(results, checks, args, wall, links)
    write_section(args.out_dir / "RESULTS.md", "reproduce_paper", body)
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=1))
    print(body)
    log(f"wrote {args.out_dir / 'RESULTS.md'} and {args.out_dir / 'images'}")


if __name__ == "__main__":
    main()

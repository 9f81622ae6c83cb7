"""Joint simplification of several layers under one accuracy budget, on MNIST.

For LeNet-300-100 (targets: the input pixels of fc1, fc1's and fc2's neurons) and LeNet-5 (the
800 flattened conv features that feed fc1, and fc1's neurons), this script

* runs the single-layer sweeps and the joint strategies (greedy by marginal cost, with and without
  the data-driven refit; sequential in network order and in reverse, with equal and front-loaded
  budget shares), choosing every configuration on a held-out validation split (the last 5000
  training images, which the networks were not trained on) under the budget;
* reports the chosen configurations' test accuracy (10000 test images), energy and memory ratios;
* fine-tunes the best reduced network for one epoch and reports the accuracy it recovers;
* draws the Pareto figure (single-layer curves, joint configurations, joint front).

    python benchmarks/joint_reduction.py --data-dir ../shared/data/mnist --out docs
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import DEFAULT_MNIST, accuracy, loader, mnist_tensors, trained
from torchmetrics.classification import MulticlassAccuracy

from lightning_neuronprune import EnergyModel, collect_statistics, find_junction
from lightning_neuronprune.core.selection import METHODS
from lightning_neuronprune.lightning.reporting import mark_confirmations, tradeoff_figure
from lightning_neuronprune.search.confirmation import confirm_front, front_within, split_batches
from lightning_neuronprune.search.evaluation import CachedEvaluator
from lightning_neuronprune.search.joint import JointPoint, JointSearch
from lightning_neuronprune.search.pareto import pareto_front
from lightning_neuronprune.search.strategies import greedy, sequential
from lightning_neuronprune.search.sweep import SweepPoint, sweep_junction

SETUPS = {
    # arch: (targets, budget as a fraction, paper reference)
    "lenet300100": (["net.fc1:in", "net.fc1", "net.fc2"], 0.020, "26.71× energy at 1.97 points"),
    "lenet5": (["net.fc1:in", "net.fc1"], 0.0184, "12.30× memory at 1.84 points (FC1 row)"),
}


def _metric() -> MulticlassAccuracy:
    return MulticlassAccuracy(10, average="micro")


def _energy_ceiling(model: torch.nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Energy if every Linear layer cost nothing (conv layers whole): (joules, ratio)."""
    em = EnergyModel()
    base = em.estimate(model, example)
    convs = {k: v for k, v in base.per_layer.items() if "conv" in k}
    floor = em.report(convs, output_activations=0)
    return floor.total, base.total / floor.total


def _row(
    name: str, pt: Any, test_acc: float, base_test: float, confirmation: Any = None,
    unconfirmed: tuple[Any, float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    row = {
        "configuration": name,
        "p": pt.label if isinstance(pt, JointPoint) else f"{pt.layer}={pt.p}",
        "val_drop_points": 100 * pt.accuracy_drop,
        "confirmed_drop_points": None if confirmation is None else 100 * confirmation,
        "test_accuracy": 100 * test_acc,
        "test_drop_points": 100 * (base_test - test_acc),
        "energy_ratio": pt.energy_ratio,
        "memory_ratio": pt.memory_ratio,
        "params": pt.energy.weights,
    }
    if unconfirmed is not None:  # the search's own choice, before confirmation
        upt, uacc = unconfirmed
        row["unconfirmed"] = {
            "p": upt.label if isinstance(upt, JointPoint) else f"{upt.layer}={upt.p}",
            "energy_ratio": upt.energy_ratio,
            "test_drop_points": 100 * (base_test - uacc),
        }
    return row


def _apply_single(
    model: torch.nn.Module, junctions: list, pt: SweepPoint, stats: dict, affine: bool,
    method: str = "svd_qr",
) -> Any:  # fmt: skip
    from lightning_neuronprune import eliminate_neurons

    j = next(j for j in junctions if j.layer == pt.layer)
    reduced, _ = eliminate_neurons(
        model,
        j.target,
        pt.p,
        stats={j.consumer: stats[j.consumer]},
        kept={j.target: pt.kept},
        affine=affine,
        method=method,
    )
    return reduced


def fine_tune(model: torch.nn.Module, data_dir: str, epochs: int, limit_train: int | None) -> None:
    from lightning_neuronprune.testing.datasets import MNISTDataModule

    model.train()
    model.hparams.lr = 1e-4
    model.hparams.epochs = 0
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(
        model, datamodule=MNISTDataModule(data_dir, batch_size=128, limit_train=limit_train)
    )


def run_arch(arch: str, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    targets, budget, paper = SETUPS[arch]
    started = time.perf_counter()
    model = trained(arch, args.data_dir, epochs=args.epochs, limit_train=args.limit_train)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    n_stats = args.limit_train or 55_000
    train = loader(x_train[:n_stats], y_train[:n_stats])
    if args.select_on == "test":
        val = loader(x_test, y_test)  # the paper's setting: the budget is checked on the test set
    else:
        val = loader(x_train[55_000:], y_train[55_000:])
    confirm = None
    if args.confirm > 0:  # search on one part of the selection set, confirm on the other
        val, held_out = split_batches(val, args.confirm)
        confirm = (torch.cat([b[0] for b in held_out]), torch.cat([b[1] for b in held_out]))
    example = x_test[:1]
    base_test = accuracy(model, x_test, y_test)
    base_confirm = accuracy(model, *confirm) if confirm else None
    tests: dict[int, float] = {}

    def build(pt: Any) -> torch.nn.Module:
        if isinstance(pt, JointPoint):
            reduced = copy.deepcopy(model)
            search.apply(reduced, pt)
            return reduced
        return _apply_single(model, junctions, pt, stats, args.affine, args.method)

    def test_acc(pt: Any) -> float:
        if id(pt) not in tests:
            tests[id(pt)] = accuracy(build(pt), x_test, y_test)
        return tests[id(pt)]

    confirmations: list[Any] = []

    def chosen_row(label: str, pts: list[Any]) -> tuple[Any, dict[str, Any]] | None:
        """The lowest-energy point within the budget, confirmed on the held-out part."""
        front = front_within(pts, budget)
        if not front:
            return None
        if confirm is None:
            return front[0], _row(label, front[0], test_acc(front[0]), base_test)
        best, tried = confirm_front(
            front, lambda pt: accuracy(build(pt), *confirm), base_confirm, budget
        )
        confirmations.extend(tried)
        if best is None:
            return None
        c = next(t for t in tried if t.point is best)
        return best, _row(
            label, best, test_acc(best), base_test, c.confirmed_drop,
            unconfirmed=(front[0], test_acc(front[0])),
        )  # fmt: skip

    junctions = [find_junction(model, t) for t in targets]
    stats = collect_statistics(model, [j.consumer for j in junctions], train)
    em = EnergyModel()

    singles: dict[str, list[SweepPoint]] = {}
    baseline = None
    for j in junctions:
        ev = CachedEvaluator(model, j.consumer, val, _metric())
        baseline = baseline or (ev(), em.estimate(model, example))
        singles[j.layer] = sweep_junction(
            model, j, stats[j.consumer], ev, em, example, ranks=args.ranks, baseline=baseline,
            max_accuracy_drop=budget, affine=args.affine, method=args.method,
        )  # fmt: skip

    rows, all_joint, timings = [], [], {}
    for layer, pts in singles.items():
        got = chosen_row(f"single layer {layer}", [pt for pt in pts if pt.p < pt.n])
        if got:
            rows.append(got[1])

    search = JointSearch(
        model, junctions, stats, val, _metric(), em, example, train_data=train,
        ranks=args.ranks, affine=args.affine, baseline=baseline, method=args.method,
        max_samples=args.refit_samples,
    )  # fmt: skip
    n = len(junctions)
    strategies = {
        "greedy": lambda: greedy(search, budget, refit=True),
        "sequential, network order, equal shares": lambda: sequential(search, budget),
        "sequential, reverse order, equal shares": lambda: sequential(
            search, budget, order=[j.layer for j in reversed(junctions)]
        ),
        "sequential, network order, front-loaded shares": lambda: sequential(
            search, budget, shares=[2.0 ** (n - i) for i in range(n)]
        ),
        "greedy, compensating refits of its path": lambda: greedy(
            search, budget, refit=False, compensate=True, slack=budget / 2
        ),
    }
    strategies = {k: v for i, (k, v) in enumerate(strategies.items()) if str(i) in args.strategies}
    best_joint: JointPoint | None = None
    for name, fn in strategies.items():
        t0 = time.perf_counter()
        pts = fn()
        timings[name] = time.perf_counter() - t0
        all_joint += pts
        kinds = sorted({pt.strategy for pt in pts})
        for kind in kinds:
            suffix = {"greedy+refit": " + refit", "greedy+compensated": ": compensated"}
            label = name + suffix.get(kind, "")
            got = chosen_row(label, [pt for pt in pts if pt.strategy == kind])
            if got is None:
                continue
            best, row = got
            rows.append(row)
            if best_joint is None or best.energy.total < best_joint.energy.total:
                best_joint = best

    # compensated refits against the plain greedy fit of the same configuration
    plain = {tuple(pt.config.items()): pt for pt in all_joint if pt.strategy == "greedy"}
    compensation = []
    for comp in all_joint:
        same = plain.get(tuple(comp.config.items()))
        if comp.strategy != "greedy+compensated" or same is None:
            continue
        compensation.append(
            {
                "configuration": comp.label,
                "energy_ratio": comp.energy_ratio,
                "search_drop_points": (100 * same.accuracy_drop, 100 * comp.accuracy_drop),
                "test_drop_points": (
                    100 * (base_test - test_acc(same)),
                    100 * (base_test - test_acc(comp)),
                ),
            }
        )

    finetune = None
    if best_joint is not None and args.finetune_epochs > 0:
        reduced = copy.deepcopy(model)
        search.apply(reduced, best_joint)
        before = accuracy(reduced, x_test, y_test)
        fine_tune(reduced, args.data_dir, args.finetune_epochs, args.limit_train)
        after = accuracy(reduced, x_test, y_test)
        finetune = {
            "configuration": best_joint.label,
            "test_before": 100 * before,
            "test_after": 100 * after,
            "baseline": 100 * base_test,
            "epochs": args.finetune_epochs,
        }

    ceiling = _energy_ceiling(model, example) if arch == "lenet5" else None
    figure_path = None
    if args.out:
        images = Path(args.out) / "images"
        images.mkdir(parents=True, exist_ok=True)
        fig = tradeoff_figure(singles, best_joint, joint=all_joint)
        if confirmations:
            mark_confirmations(fig, confirmations, baseline[0])
        fig.axes[0].set_title(
            f"{arch}: single-layer curves and joint configurations ({args.select_on} set, "
            f"{args.method})",
            fontsize=9,
        )
        figure_path = images / f"joint_{arch}_{args.select_on}_{args.method}.png"
        fig.savefig(figure_path)
    return {
        "arch": arch,
        "targets": targets,
        "budget_points": 100 * budget,
        "paper": paper,
        "baseline_test": 100 * base_test,
        "baseline_val": 100 * baseline[0],
        "select_on": args.select_on,
        "affine": args.affine,
        "method": args.method,
        "confirm": args.confirm,
        "baseline_confirm": None if base_confirm is None else 100 * base_confirm,
        "confirmations": [c.as_dict() for c in confirmations],
        "rows": rows,
        "front": [pt.as_dict() for pt in pareto_front(all_joint)],
        "evaluated": len(all_joint),
        "timings_s": timings,
        "finetune": finetune,
        "compensation": compensation,
        "energy_ceiling": ceiling,
        "figure": str(figure_path) if figure_path else None,
        "wall_s": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['arch']}: targets {', '.join(result['targets'])}, budget "
        f"{result['budget_points']:.2f} points",
        "",
        f"Selection method `{result['method']}`. Configurations searched on the "
        f"{result['select_on']} set"
        + (
            f" (the {1 - result['confirm']:.0%} search part; every choice re-measured on the "
            f"held-out {result['confirm']:.0%}, {result['baseline_confirm']:.2f}% unreduced)"
            if result["confirm"]
            else ""
        )
        + f". Baseline: {result['baseline_test']:.2f}% test, {result['baseline_val']:.2f}% on "
        f"the search set."
        f" Paper: {result['paper']}. {result['evaluated']} joint configurations evaluated in "
        f"{result['wall_s']:.0f} s.",
        "",
        "| configuration | kept p | search drop | confirmed drop | test acc | test drop "
        "| energy ratio | memory ratio | params | unconfirmed choice: energy, test drop |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        conf = r["confirmed_drop_points"]
        u = r.get("unconfirmed")
        lines.append(
            f"| {r['configuration']} | {r['p']} | {r['val_drop_points']:.2f} | "
            f"{'—' if conf is None else f'{conf:.2f}'} | "
            f"{r['test_accuracy']:.2f}% | {r['test_drop_points']:.2f} | "
            f"{r['energy_ratio']:.2f}× | {r['memory_ratio']:.2f}× | {r['params']} | "
            + (
                "same"
                if u is None or u["p"] == r["p"]
                else f"{u['energy_ratio']:.2f}×, {u['test_drop_points']:.2f}"
            )
            + " |"
        )
    if result["energy_ceiling"]:
        joules, ratio = result["energy_ceiling"]
        lines += [
            "",
            f"Energy ceiling with the conv layers whole (every Linear layer free): "
            f"{joules * 1e6:.2f} µJ per inference, i.e. at most {ratio:.2f}× lower energy.",
        ]
    if result["finetune"]:
        f = result["finetune"]
        lines += [
            "",
            f"Fine-tuning the best joint configuration ({f['configuration']}) for {f['epochs']} "
            f"epoch(s) at lr 1e-4: test accuracy {f['test_before']:.2f}% → {f['test_after']:.2f}% "
            f"(unreduced: {f['baseline']:.2f}%).",
        ]
    if result.get("compensation"):
        lines += [
            "",
            "Compensating refits at equal configurations (plain greedy fit → compensated fit):",
            "",
            "| configuration | energy ratio | search drop | test drop |",
            "|---|---|---|---|",
        ]
        for c in result["compensation"]:
            (s0, s1), (t0, t1) = c["search_drop_points"], c["test_drop_points"]
            lines.append(
                f"| {c['configuration']} | {c['energy_ratio']:.2f}× | {s0:.2f} → {s1:.2f} | "
                f"{t0:.2f} → {t1:.2f} |"
            )
    timings = ", ".join(f"{k}: {v:.0f} s" for k, v in result["timings_s"].items())
    lines += ["", f"Strategy wall times: {timings}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_MNIST)
    parser.add_argument("--arch", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--ranks", default="auto", help="'auto', 'all' or an int step")
    parser.add_argument("--affine", action="store_true", help="fit intercepts")
    parser.add_argument(
        "--select-on", choices=("val", "test"), default="val",
        help="where the budget is checked: the held-out validation split (default) or, as in the "
        "paper, the test set",
    )  # fmt: skip
    parser.add_argument("--method", choices=METHODS, default="svd_qr", help="selection method")
    parser.add_argument(
        "--confirm", type=float, default=0.5,
        help="fraction of the selection set held out to confirm each choice (0: no confirmation)",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", default="0123",
        help="joint strategies to run, by position: 0 greedy, 1 sequential, 2 sequential reverse, "
        "3 sequential front-loaded, 4 greedy with compensating refits",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--refit-samples", type=int, default=20_000,
        help="training images for re-collected statistics (sequential, refits)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (recipe)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--out", default=None, help="directory for joint.json and images/")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI")
    args = parser.parse_args()
    if args.ranks not in ("auto", "all"):
        args.ranks = int(args.ranks)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.limit_train, args.ranks, args.finetune_epochs = 1, 3000, 64, 1
    data = mnist_tensors(args.data_dir)
    results = []
    for arch in args.arch:
        result = run_arch(arch, args, data)
        results.append(result)
        print(markdown(result), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"joint_{args.select_on}_{args.method}.json").write_text(
            json.dumps(results, indent=2, default=str)
        )


if __name__ == "__main__":
    main()

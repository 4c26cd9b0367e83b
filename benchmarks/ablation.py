r"""The paper's ablations at any scale: Table 2 (variants) and Appendix F Tables 4-6 (lambda, width, tau).

  python benchmarks/ablation.py --out=results/ablation                         # Table 2, resumable
  python benchmarks/ablation.py --sweep=class_weight --values=0.1,1,10,100,1000 --out=results/ablation_lambda
  python benchmarks/ablation.py --sweep=width --values=1,2,3,4 --out=results/ablation_width_sweep
  python benchmarks/ablation.py --sweep=temperature --values=0.01,0.1,0.5,1,2 --out=results/ablation_tau
  python benchmarks/ablation.py --preset=smoke --out=/tmp/ablation                 # seconds: the test's setting
  python benchmarks/ablation.py --model=resnet18 --preset=full --out=results/ablation_resnet18  # accelerators

Each run is one config of `contrastood.configs.ablation` (variant or swept value, seed) trained and
evaluated in its own resumable workdir under OUT/runs; a finished run (ood_report.json at its final
step) is not redone, an interrupted one resumes, and a run made with other settings is refused rather
than mixed into this study. A sweep varies one argument of contrastive + label smoothing. OUT gets
ablation.json and ablation.md: the paper's layout (rows = variants or values, one AUROC column
"mean ± std over seeds" per (D_in, D_out) pair, then the OOD-rank spread: the standard deviation
across seeds of each OOD sample's rank, averaged over samples), then a detailed table with FPR@95 and
the MSP and Mahalanobis baselines on the same features. Nothing is tuned on OOD data.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contrastood.configs import ablation as study  # noqa: E402

SWEEPS = ("variants", "class_weight", "width", "temperature")
SWEEP_LABELS = {"class_weight": "λ", "width": "width", "temperature": "τ"}
LS_CT = {"supervised": ("x", "x"), "label_smoothing": ("✓", "x"), "contrastive": ("x", "✓"),
         "contrastive+ls": ("✓", "✓")}


def run_arg(settings: dict, **run) -> str:
    """The config argument of one run: the study's settings plus its variant/value and seed."""
    return ",".join(f"{k}={v}" for k, v in {**settings, **run}.items())


def run_one(config, workdir: pathlib.Path) -> dict:
    from contrastood import train
    from contrastood.ood import evaluate

    report = workdir / "ood_report.json"
    total = config.train.stage1_steps + config.train.stage2_steps
    check_same_study(config, workdir)
    if report.exists():
        done = json.loads(report.read_text())
        if done["step"] == total:
            return done
    start = time.time()
    state = train.train_and_evaluate(config, str(workdir))
    evaluate.evaluate(config, str(workdir), state=state)
    done = json.loads(report.read_text())
    done["wall_seconds"] = time.time() - start
    report.write_text(json.dumps(done, indent=2))
    return done


def check_same_study(config, workdir: pathlib.Path) -> None:
    """Refuses to reuse or resume a run that was started with other settings (say another --width)."""
    saved = workdir / "config.json"
    if not saved.exists():
        return
    from contrastood import config_lib

    changes = config_lib.config_changes(json.loads(saved.read_text()), config_lib.to_dict(config),
                                        shared_keys_only=True)
    if changes:
        raise SystemExit(
            f"{workdir} was run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())}). "
            "Give this study its own --out, or delete that run directory to redo it.")


def rank_std_across_seeds(workdirs: list[pathlib.Path], set_name: str, scorer: str) -> float:
    """Paper's second measure: per OOD sample, the std over seeds of its OOD rank; mean over samples."""
    from contrastood.ood import metrics

    ranks = []
    for w in workdirs:
        with np.load(w / "ood_scores.npz") as s:
            ranks.append(metrics.ood_rank(s[f"in_distribution/{scorer}"], s[f"{set_name}/{scorer}"]))
    return float(np.mean(np.std(np.stack(ranks), axis=0))) if len(ranks) > 1 else float("nan")


def aggregate(reports: dict, workdirs: dict, seeds: list[int], rows: list[str]) -> dict:
    table = {}
    for row in rows:
        runs = [reports[(row, s)] for s in seeds]
        acc = [r["in_distribution"]["test_accuracy"] for r in runs]
        entry = {"test_accuracy": {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "values": acc},
                 "wall_seconds": float(sum(r.get("wall_seconds", 0.0) for r in runs)), "sets": {}}
        for set_name in runs[0]["results"]:
            entry["sets"][set_name] = {}
            for scorer in study.SCORERS:
                # A scorer that failed in a run (its reason is in that run's report) counts as NaN here.
                got = [r["results"][set_name].get(scorer, {}) for r in runs]
                au = [g.get("auroc", float("nan")) for g in got]
                fpr = [g.get("fpr_at_95_tpr_in", float("nan")) for g in got]
                entry["sets"][set_name][scorer] = {
                    "auroc_mean": float(np.mean(au)), "auroc_std": float(np.std(au)), "auroc": au,
                    "fpr95_mean": float(np.mean(fpr)), "fpr95_std": float(np.std(fpr)),
                    "ood_rank_std_across_seeds": rank_std_across_seeds(
                        [workdirs[(row, s)] for s in seeds], set_name, scorer) if all(got) else float("nan")}
        entry["failed_scorers"] = {k: v for r in runs for k, v in r.get("failed_scorers", {}).items()}
        table[row] = entry
    return table


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def paper_table(table: dict, meta: dict) -> list[str]:
    """Table 2 / Tables 4-6 layout: one row per variant or value, AUROC per (D_in, D_out), rank spread."""
    sets = list(next(iter(table.values()))["sets"])
    d_in = meta.get("d_in", "CIFAR-10 0-5")
    if meta["sweep"] == "variants":
        head = ["LS", "CT"]
        cells = lambda row: list(LS_CT[row])  # noqa: E731
    else:
        head = [SWEEP_LABELS[meta["sweep"]]]
        cells = lambda row: [row]  # noqa: E731
    lines = [f"| {' | '.join(head)} | " + " | ".join(f"AUROC D_in={d_in}, D_out={s}" for s in sets) + " | "
             + " | ".join(f"OOD rank σ {s}" for s in sets) + " |",
             "|" + "---|" * len(head) + "---:|" * (2 * len(sets))]
    for row, entry in table.items():
        g = [entry["sets"][s]["gaussian"] for s in sets]
        lines.append("| " + " | ".join(cells(row)) + " | " + " | ".join(pct(x["auroc_mean"], x["auroc_std"]) for x in g)
                     + " | " + " | ".join(f"{x['ood_rank_std_across_seeds']:.1f}" for x in g) + " |")
    return lines


def markdown(table: dict, meta: dict) -> str:
    lines = [f"Sweep `{meta['sweep']}`, preset `{meta['preset']}`, seeds {meta['seeds']}, {meta['steps']} steps per stage, "
             f"{meta.get('model', 'resnet_tiny')} x{meta.get('width', 1)}, batch {meta['batch']}, "
             f"{100 * meta.get('train_fraction', 1.0):g}% of the training images; total run time "
             f"{meta['wall_seconds'] / 60:.1f} min on {meta['machine']}. Gaussian score (Eq. 2); mean ± std over "
             "seeds; AUROC and FPR@95TPR (in-distribution positive) in %; rank σ = std across seeds of each OOD "
             "sample's rank (percentage points), averaged.", "", *paper_table(table, meta), "",
             "| run | test acc. | OOD set | Gaussian AUROC | Gaussian FPR95 | rank σ | MSP AUROC | Mahalanobis AUROC |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    failed = {f"{row}: {name}": reason for row, e in table.items() for name, reason in e.get("failed_scorers", {}).items()}
    for row, e in table.items():
        for i, (set_name, s) in enumerate(e["sets"].items()):
            acc = pct(e["test_accuracy"]["mean"], e["test_accuracy"]["std"]) if i == 0 else ""
            g, m, t = s["gaussian"], s["msp"], s["mahalanobis"]
            lines.append(f"| {row if i == 0 else ''} | {acc} | {set_name} | {pct(g['auroc_mean'], g['auroc_std'])} | "
                         f"{pct(g['fpr95_mean'], g['fpr95_std'])} | {g['ood_rank_std_across_seeds']:.1f} | "
                         f"{pct(m['auroc_mean'], m['auroc_std'])} | {pct(t['auroc_mean'], t['auroc_std'])} |")
    if failed:
        lines += ["", "Scorers that failed (NaN above):", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--sweep", default="variants", choices=SWEEPS,
                        help="variants: Table 2; class_weight / width / temperature: Tables 4 / 5 / 6")
    parser.add_argument("--values", default="", help="the swept values (comma-separated), or the variants")
    parser.add_argument("--variants", default="", help="--sweep=variants: comma-separated subset (old name)")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per stage, overriding the preset's budget (warm-up 5%% of it)")
    parser.add_argument("--width", type=int, default=1, help="width multiplier of the ResNet (resnet_tiny x2: 32-64-128)")
    parser.add_argument("--model", default="resnet_tiny",
                        help="resnet_tiny (the CPU study), resnet18, resnet34 or resnet50 (accelerators)")
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="train on this fixed fraction of the training images (the small-data regime)")
    parser.add_argument("--out", default=str(ROOT / "results" / "ablation"))
    parser.add_argument("--data", default=str(study.DATA))
    args = parser.parse_args(argv)
    from contrastood import models

    if args.model not in models.ARCHITECTURES:
        parser.error(f"unknown --model {args.model!r}; choose from {sorted(models.ARCHITECTURES)}")
    if not 0 < args.train_fraction <= 1:
        raise SystemExit(f"--train_fraction must be in (0, 1], got {args.train_fraction}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sweep == "variants":
        rows = (args.values or args.variants or ",".join(study.VARIANTS)).split(",")
        unknown = sorted(set(rows) - set(study.VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(study.VARIANTS)}")
    else:
        if not args.values:
            parser.error(f"--sweep={args.sweep} needs --values, e.g. --values=0.1,1,10")
        rows = args.values.split(",")
    settings = {"preset": args.preset, "model": args.model, "width": args.width, "steps": args.steps,
                "train_fraction": args.train_fraction, "data": args.data}
    settings = {k: v for k, v in settings.items() if v not in (0, "")}

    def config_of(row: str, seed: int):
        run = {"variant": row} if args.sweep == "variants" else {"variant": "contrastive+ls", args.sweep: row}
        return study.get_config(run_arg({**settings, **run}, seed=seed))

    out = pathlib.Path(args.out)
    reports, workdirs = {}, {}
    start = time.time()
    for seed in seeds:
        for row in rows:
            name = row if args.sweep == "variants" else f"{args.sweep}={row}"
            workdir = out / "runs" / f"{name}_seed{seed}"
            workdirs[(row, seed)] = workdir
            reports[(row, seed)] = run_one(config_of(row, seed), workdir)
    table = aggregate(reports, workdirs, seeds, rows)
    any_config = config_of(rows[0], seeds[0])
    meta = {"sweep": args.sweep, "preset": args.preset, "seeds": seeds, "steps": any_config.train.stage2_steps,
            "width": args.width, "model": args.model, "train_fraction": args.train_fraction,
            "batch": any_config.train.batch_size, "wall_seconds": sum(t["wall_seconds"] for t in table.values()),
            "this_invocation_seconds": time.time() - start, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    text = markdown(table, meta)
    (out / "ablation.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()

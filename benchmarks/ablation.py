r"""Small-scale reproduction of the paper's Table 2 ablation on real CIFAR-10 (../shared/data).

  python benchmarks/ablation.py --out=results/ablation                # the study (resumable)
  python benchmarks/ablation.py --preset=smoke --out=/tmp/ablation    # seconds: the test's setting
  python benchmarks/ablation.py --width=4 --variants=supervised,label_smoothing,contrastive+ls \
      --out=results/ablation_width4                                  # the other settings: see the README
  python benchmarks/ablation.py --model=resnet18 --preset=full --out=results/ablation_resnet18  # accelerators

Four variants with the same tiny CIFAR ResNet, augmentations, step budget and scoring:
supervised only; + label smoothing; + contrastive training; + both. Each trains on CIFAR-10 classes
0-5 and is evaluated on Tiny ImageNet (near), CIFAR-10 classes 6-9 (near), DTD (far) and Gaussian
noise (far) with the paper's Gaussian score plus the MSP and tied-Mahalanobis baselines on the same
features. Every run is an ordinary checkpointed workdir under OUT/runs; a finished run (one with
ood_report.json at its final step) is not redone, an interrupted one resumes. The aggregate goes to
OUT/ablation.json and OUT/ablation.md: mean and standard deviation over seeds of AUROC, FPR@95TPR
and test accuracy, and the paper's second measure, the standard deviation across seeds of each OOD
sample's rank, averaged over the samples. No OOD data is used for training or tuning.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (contrastive, label smoothing)
    "supervised": (False, 0.0),
    "label_smoothing": (False, 0.1),
    "contrastive": (True, 0.0),
    "contrastive+ls": (True, 0.1),
}
SCORERS = ["gaussian", "msp", "mahalanobis"]


def study_config(preset: str, data: pathlib.Path, variant: str, seed: int, steps: int | None = None,
                 width: int = 1, model: str = "resnet_tiny", train_fraction: float = 1.0):
    from contrastood import config_lib

    contrastive, smoothing = VARIANTS[variant]
    c = config_lib.base_config()
    c.seed = seed
    c.model.name = model
    c.model.width = width
    c.model.proj_dim = 64
    c.train.contrastive = contrastive
    c.train.label_smoothing = smoothing
    c.train.class_weight = 10.0
    c.train.temperature = 0.5
    c.ood.scorers = tuple(SCORERS)
    c.ood.plots = False
    if preset == "smoke":
        c.data.train = "sklearn:digits:train#classes=0-5"
        c.data.test = "sklearn:digits:test#classes=0-5"
        c.data.num_classes = 6
        c.ood.sets = config_lib.ood_sets(near_digits_6to9="sklearn:digits:test#classes=6-9",
                                         far_noise="noise:gaussian:64")
        c.train.batch_size = 32
        steps, warmup = steps or 3, 1
        c.eval_batch_size = 64
    else:
        train = f"npz:{data}/cifar10-train-part1of2.npz+{data}/cifar10-train-part2of2.npz"
        test = f"npz:{data}/cifar10-test.npz"
        c.data.train, c.data.test, c.data.num_classes = f"{train}#classes=0-5", f"{test}#classes=0-5", 6
        c.ood.sets = config_lib.ood_sets(
            near_tinyimagenet32=f"npz:{data}/tinyimagenet32-test.npz",
            near_cifar10_6to9=f"{test}#classes=6-9",
            far_dtd10=f"npz:{data}/dtd10-all.npz",
            far_gaussian_noise="noise:gaussian:2000",
        )
        c.train.batch_size = 128
        preset_steps, preset_warmup = (1500, 75) if preset == "full" else (300, 20)
        steps, warmup = (steps, max(1, steps // 20)) if steps else (preset_steps, preset_warmup)
        c.eval_batch_size = 500
    if not 0 < train_fraction <= 1:
        raise SystemExit(f"--train_fraction must be in (0, 1], got {train_fraction}")
    if train_fraction < 1:  # a fixed subset (seed 0) of the training images, the same for every variant
        c.data.train += f"&fraction=0:{train_fraction:g}"
    # Same budget of joint/supervised steps for every variant; contrastive variants first spend the
    # same number of steps on stage 1 (as in the paper, pre-training comes on top).
    c.train.stage1_steps = steps if contrastive else 0
    c.train.stage2_steps = steps
    c.train.warmup_steps = warmup
    c.train.learning_rate = 1.0 if contrastive else 0.5
    c.log_every_steps = max(1, steps // 10)
    c.checkpoint_every_steps = max(1, steps // 3)
    c.eval_every_steps = 10**9
    c.ood.knn_k = 10
    return c


def run_one(config, workdir: pathlib.Path) -> dict:
    from contrastood import train
    from contrastood.ood import evaluate

    report = workdir / "ood_report.json"
    total = config.train.stage1_steps + config.train.stage2_steps
    _check_same_study(config, workdir)
    if report.exists():
        done = json.loads(report.read_text())
        if done["step"] == total:
            return done
    start = time.time()
    state = train.train_and_evaluate(config, str(workdir))
    summary = evaluate.evaluate(config, str(workdir), state=state)
    summary["wall_seconds"] = time.time() - start
    report.write_text(json.dumps({**json.loads(report.read_text()), "wall_seconds": summary["wall_seconds"]},
                                 indent=2))
    return json.loads(report.read_text())


def _check_same_study(config, workdir: pathlib.Path) -> None:
    """Refuses to reuse or resume a run that was started with other settings (say another --width)."""
    saved = workdir / "config.json"
    if not saved.exists():
        return
    from contrastood import config_lib

    changes = config_lib.config_changes(json.loads(saved.read_text()), json.loads(config.to_json_best_effort()),
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


def aggregate(reports: dict, workdirs: dict, seeds: list[int], variants: list[str]) -> dict:
    table = {}
    for variant in variants:
        runs = [reports[(variant, s)] for s in seeds]
        acc = [r["in_distribution"]["test_accuracy"] for r in runs]
        entry = {"test_accuracy": {"mean": float(np.mean(acc)), "std": float(np.std(acc)), "values": acc},
                 "wall_seconds": float(sum(r.get("wall_seconds", 0.0) for r in runs)), "sets": {}}
        for set_name in runs[0]["results"]:
            entry["sets"][set_name] = {}
            for scorer in SCORERS:
                au = [r["results"][set_name][scorer]["auroc"] for r in runs]
                fpr = [r["results"][set_name][scorer]["fpr_at_95_tpr_in"] for r in runs]
                entry["sets"][set_name][scorer] = {
                    "auroc_mean": float(np.mean(au)), "auroc_std": float(np.std(au)), "auroc": au,
                    "fpr95_mean": float(np.mean(fpr)), "fpr95_std": float(np.std(fpr)),
                    "ood_rank_std_across_seeds": rank_std_across_seeds(
                        [workdirs[(variant, s)] for s in seeds], set_name, scorer)}
        table[variant] = entry
    return table


def markdown(table: dict, meta: dict) -> str:
    lines = [f"Preset `{meta['preset']}`, seeds {meta['seeds']}, {meta['steps']} steps per stage, "
             f"{meta.get('model', 'resnet_tiny')} x{meta.get('width', 1)}, batch {meta['batch']}, "
             f"{100 * meta.get('train_fraction', 1.0):g}% of the training images; total wall time {meta['wall_seconds'] / 60:.1f} min on "
             f"{meta['machine']}. Mean ± std over seeds; AUROC and FPR@95TPR (in-distribution positive) in %; "
             f"rank σ = std across seeds of each OOD sample's rank (percentage points), averaged.", "",
             "| variant | test acc. | OOD set | Gaussian AUROC | Gaussian FPR95 | rank σ | MSP AUROC | Mahalanobis AUROC |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for variant, e in table.items():
        for i, (set_name, s) in enumerate(e["sets"].items()):
            acc = f"{100 * e['test_accuracy']['mean']:.1f} ± {100 * e['test_accuracy']['std']:.1f}" if i == 0 else ""
            g, m, t = s["gaussian"], s["msp"], s["mahalanobis"]
            lines.append(f"| {variant if i == 0 else ''} | {acc} | {set_name} | "
                         f"{100 * g['auroc_mean']:.1f} ± {100 * g['auroc_std']:.1f} | "
                         f"{100 * g['fpr95_mean']:.1f} ± {100 * g['fpr95_std']:.1f} | "
                         f"{g['ood_rank_std_across_seeds']:.1f} | "
                         f"{100 * m['auroc_mean']:.1f} ± {100 * m['auroc_std']:.1f} | "
                         f"{100 * t['auroc_mean']:.1f} ± {100 * t['auroc_std']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=["smoke", "default", "full"])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per stage, overriding the preset's budget (warm-up 5%% of it)")
    parser.add_argument("--width", type=int, default=1, help="width multiplier of the ResNet (resnet_tiny x2: 32-64-128)")
    parser.add_argument("--model", default="resnet_tiny",
                        help="resnet_tiny (the CPU study), resnet18, resnet34 or resnet50 (accelerators)")
    parser.add_argument("--train_fraction", type=float, default=1.0,
                        help="train on this fixed fraction of the training images (the small-data regime: "
                             "more epochs for the same steps)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--out", default=str(ROOT / "results" / "ablation"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    import platform

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    from contrastood import models

    if args.model not in models.ARCHITECTURES:
        parser.error(f"unknown --model {args.model!r}; choose from {sorted(models.ARCHITECTURES)}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = pathlib.Path(args.out)
    setting = dict(steps=args.steps, width=args.width, model=args.model, train_fraction=args.train_fraction)
    reports, workdirs = {}, {}
    start = time.time()
    for seed in seeds:
        for variant in variants:
            config = study_config(args.preset, pathlib.Path(args.data), variant, seed, **setting)
            workdir = out / "runs" / f"{variant}_seed{seed}"
            workdirs[(variant, seed)] = workdir
            reports[(variant, seed)] = run_one(config, workdir)
    table = aggregate(reports, workdirs, seeds, variants)
    any_config = study_config(args.preset, pathlib.Path(args.data), "supervised", seeds[0], **setting)
    meta = {"preset": args.preset, "seeds": seeds, "steps": any_config.train.stage2_steps, "width": args.width,
            "model": args.model, "train_fraction": args.train_fraction, "batch": any_config.train.batch_size,
            "wall_seconds": sum(t["wall_seconds"] for t in table.values()),
            "this_invocation_seconds": time.time() - start,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    text = markdown(table, meta)
    (out / "ablation.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()

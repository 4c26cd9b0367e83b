r"""How the digits demo's budget and augmentation strength were chosen: in-distribution validation accuracy only.

  python benchmarks/select_demo.py --out=results/demo_selection

Holds out 20% of the digits 0-5 training split (a fixed fraction; the test split and every OOD set are
never looked at) and trains on the other 80%: ours (contrastive + label smoothing) over a small grid of
steps per stage and colour-distortion strength, then the baseline (supervised, no smoothing, the same
augmentation, as the paper's baseline) over its step budget. Prints and writes the validation accuracy
of every run and the choice (the best of each grid). configs/digits.py uses the choice.
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contrastood import config_lib, models, parallel, train  # noqa: E402
from contrastood.configs import digits  # noqa: E402
from contrastood.data import sources  # noqa: E402

TRAIN = "sklearn:digits:train#classes=0-5&fraction=0:0.8&fraction_seed=1"
VALIDATION = "sklearn:digits:train#classes=0-5&fraction=0.8:1&fraction_seed=1"


def validation_accuracy(config, workdir: pathlib.Path) -> float:
    state = train.train_and_evaluate(config, str(workdir))
    mesh = parallel.create_mesh()
    model = models.from_config(config)
    step = train.jit_eval_step(train.make_eval_step(model), mesh)
    return train.evaluate_accuracy(step, state, sources.load(VALIDATION), config, mesh)


def setting(ours: bool, steps: int, colour: float):
    config = digits.get_config()
    if not ours:
        config = config_lib.baseline_config(config)
    config.data.train, config.data.test = TRAIN, ""
    config.augment.color_strength = colour
    config.train.stage1_steps = steps if ours else 0
    config.train.stage2_steps = steps
    config.train.warmup_steps = max(1, steps // 10)
    config.ood.run_after_training = False
    config.clp.run_after_evaluation = False
    config.compare.baseline = False
    config.checkpoint_every_steps = 10**6
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "demo_selection"))
    parser.add_argument("--steps", default="150,300", help="ours: steps per stage")
    parser.add_argument("--colour", default="0.3,0.5", help="ours: colour distortion strength")
    parser.add_argument("--baseline_steps", default="150,300,600")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    runs = []
    for steps, colour in itertools.product([int(s) for s in args.steps.split(",")],
                                           [float(c) for c in args.colour.split(",")]):
        start = time.time()
        accuracy = validation_accuracy(setting(True, steps, colour), out / "runs" / f"ours_{steps}_{colour}")
        runs.append({"model": "ours", "steps_per_stage": steps, "color_strength": colour,
                     "validation_accuracy": accuracy, "seconds": time.time() - start})
        print(json.dumps(runs[-1]), flush=True)
    best = max((r for r in runs if r["model"] == "ours"), key=lambda r: r["validation_accuracy"])
    for steps in (int(s) for s in args.baseline_steps.split(",")):
        start = time.time()
        accuracy = validation_accuracy(setting(False, steps, best["color_strength"]), out / "runs" / f"baseline_{steps}")
        runs.append({"model": "baseline", "steps_per_stage": steps, "color_strength": best["color_strength"],
                     "validation_accuracy": accuracy, "seconds": time.time() - start})
        print(json.dumps(runs[-1]), flush=True)
    best_baseline = max((r for r in runs if r["model"] == "baseline"), key=lambda r: r["validation_accuracy"])
    choice = {"ours": best, "baseline": best_baseline}
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps({"train": TRAIN, "validation": VALIDATION, "runs": runs,
                                                    "choice": choice}, indent=2))
    lines = ["| model | steps per stage | colour strength | validation accuracy | s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps_per_stage']} | {r['color_strength']} | {100 * r['validation_accuracy']:.1f}% | "
              f"{r['seconds']:.0f} |" for r in runs]
    lines += ["", f"Chosen: ours {best['steps_per_stage']} steps per stage at colour {best['color_strength']}; "
              f"baseline {best_baseline['steps_per_stage']} steps."]
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

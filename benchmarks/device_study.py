r"""One prepared, time-budgeted accelerator study: throughput against PyTorch, then the paper's near-OOD claim.

Here (no accelerator needed):
  python benchmarks/device_study.py pack --data=../shared/data --out=.device_pack     # the data pack
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0                 # the one missing wheel
  python benchmarks/device_study.py run --smoke --pack=.device_pack --out=/tmp/study  # what the tests run

On the device machine (one call; carry .device_pack and .whl; the README has the exact command):
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
  python3 benchmarks/device_study.py run --pack=.device_pack --out=$OUT --budget_s=300

`pack` writes CIFAR-10 classes 0-5 for training (JPEG q90 4:4:4, as many as fit in --max_mib, class
balanced), and losslessly (PNG): the whole CIFAR-10 test set (classes 0-5 in-distribution, 6-9 near
OOD), a fixed 3,000 of the 10,000 Tiny ImageNet 32 test images (near OOD) and the 1,200 DTD images
(far OOD); Gaussian noise is generated. pack.json says which set is stored how.

`run`, within --budget_s seconds of wall time from its start (imports and unpacking included):
  1. throughput (--throughput_share of the budget): contrastood's full CT+LS step and the supervised
     step, ResNet-18 then ResNet-50 (CIFAR stem), bf16 and fp32, batch 1024 and 512, most important
     first, each timed for a few seconds after its compile, with MFU against perf.py's data-sheet peak
     and feature-extraction img/s; then benchmarks/torch_reference.py's same ResNet-18 step (bf16
     autocast, channels_last, torch.compile if it compiles in --torch_compile_s) on the same card,
     and the ratio;
  2. the science, with what is left: ResNet-18, supervised against contrastive + label smoothing at
     the paper's CIFAR-10 recipe (lambda 100, tau 1, smoothing 0.01, LARS), label smoothing and
     contrastive alone and a second seed only if the budget still gives every run --min_epochs; the
     step count is planned from the measured step times and logged before anything trains; every run
     is scored by the Gaussian (Eq. 2), Mahalanobis and MSP scores on every OOD set of the pack.
Results go to --out as they arrive (device_study.json, throughput.md, science.md), so a call stopped
at its time limit still returns the throughput table and whatever finished; checkpoints go to a local
--workdir. Nothing is tuned on OOD data. `--smoke` runs the same code on the CPU in seconds (tiny
model, a few steps) for the tests.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAIN_QUALITY = 90
TIN_KEEP = 3000
PACK_FILES = {  # unpacked file -> what the ablation config reads
    "train": "cifar10-train-0to5.npz", "test": "cifar10-test.npz", "tinyimagenet": "tinyimagenet32-test.npz",
    "dtd": "dtd10-all.npz",
}


# ----------------------------------------------------------------------------------------------- pack


def _encode(images: np.ndarray, fmt: str, quality: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> (one byte blob, offsets [N + 1]) of PNG or JPEG (4:4:4) files."""
    from PIL import Image

    def one(image):
        buffer = io.BytesIO()
        if fmt == "png":
            Image.fromarray(image).save(buffer, format="PNG", optimize=True)
        else:
            Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
        return buffer.getvalue()

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        files = list(pool.map(one, images))
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    return np.frombuffer(b"".join(files), np.uint8), offsets


def _decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    def one(i):
        return np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        return np.stack(list(pool.map(one, range(len(offsets) - 1))))


def _save_set(out: pathlib.Path, name: str, images, labels, label_names, fmt, quality=0) -> dict:
    blob, offsets = _encode(images, fmt, quality)
    path = out / f"{name}.npz"
    np.savez(path, blob=blob, offsets=offsets, labels=np.asarray(labels, np.int64), label_names=np.asarray(label_names))
    return {"file": path.name, "count": int(len(images)), "bytes": path.stat().st_size,
            "encoding": "PNG (lossless)" if fmt == "png" else f"JPEG q{quality} 4:4:4"}


def pack(data: pathlib.Path, out: pathlib.Path, max_mib: float, limit: int = 0) -> dict:
    """Builds the pack (see the module docstring); `limit` caps every set (the tests' tiny pack)."""
    out.mkdir(parents=True, exist_ok=True)
    cap = (lambda n: min(n, limit)) if limit else (lambda n: n)  # noqa: E731
    load = lambda name: np.load(data / name)  # noqa: E731
    manifest = {"source": str(data), "max_mib": max_mib, "sets": {}}
    test = load("cifar10-test.npz")
    keep = np.sort(np.random.default_rng(0).permutation(len(test["labels"]))[:cap(len(test["labels"]))])
    manifest["sets"]["test"] = _save_set(out, "test", test["images"][keep], test["labels"][keep], test["label_names"],
                                         "png")
    tin = load("tinyimagenet32-test.npz")
    keep = np.sort(np.random.default_rng(0).permutation(len(tin["labels"]))[:cap(TIN_KEEP)])
    manifest["sets"]["tinyimagenet"] = _save_set(out, "tinyimagenet", tin["images"][keep], tin["labels"][keep], [],
                                                 "png")
    dtd = load("dtd10-all.npz")
    keep = np.arange(cap(len(dtd["labels"])))
    manifest["sets"]["dtd"] = _save_set(out, "dtd", dtd["images"][keep], dtd["labels"][keep], dtd["label_names"], "png")
    parts = [load("cifar10-train-part1of2.npz"), load("cifar10-train-part2of2.npz")]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    inside = np.flatnonzero(labels < 6)
    # A class-balanced fixed order (round robin over shuffled classes): the first n are kept, whatever n fits.
    per_class = [np.random.default_rng(c).permutation(inside[labels[inside] == c]) for c in range(6)]
    rank = np.concatenate([np.arange(len(p)) for p in per_class])
    order = np.concatenate(per_class)[np.argsort(rank, kind="stable")]
    used = sum(s["bytes"] for s in manifest["sets"].values())
    budget = max_mib * 2**20 - used - 4096
    if budget <= 0:
        raise SystemExit(f"the lossless evaluation sets alone take {used / 2**20:.1f} MiB, more than --max_mib={max_mib}; "
                         "raise --max_mib (a call carries at most 64 MiB in all)")
    probe = _encode(images[order[:500]], "jpeg", TRAIN_QUALITY)[1][-1] / 500  # bytes per image
    count = cap(min(len(order), int(budget / (probe * 1.02))))
    while True:
        entry = _save_set(out, "train", images[order[:count]], labels[order[:count]], parts[0]["label_names"][:6],
                          "jpeg", TRAIN_QUALITY)
        if used + entry["bytes"] <= max_mib * 2**20 or count < 100:
            break
        count = int(count * 0.97)
    manifest["sets"]["train"] = entry
    manifest["total_bytes"] = used + entry["bytes"]
    (out / "pack.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def unpack(pack_dir: pathlib.Path, data_dir: pathlib.Path) -> dict:
    """Decodes the pack into the npz files configs/ablation.py reads (preset=device)."""
    manifest = json.loads((pack_dir / "pack.json").read_text())
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, entry in manifest["sets"].items():
        target = data_dir / PACK_FILES[name]
        if target.exists():
            continue
        with np.load(pack_dir / entry["file"]) as f:
            images = _decode(f["blob"], f["offsets"])
            labels = f["labels"]
            label_names = f["label_names"]
        if name == "tinyimagenet":
            labels = np.full(len(images), -1)
        np.savez(target, images=images, labels=labels, label_names=label_names)
    return manifest


# ------------------------------------------------------------------------------------------------ run


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


class Results:
    """device_study.json plus the Markdown tables, rewritten after every measurement."""

    def __init__(self, out: pathlib.Path, meta: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "throughput": [], "torch": None, "plan": None, "science": {}, "log": []}

    def note(self, message: str) -> None:
        print(f"[device_study {time.strftime('%H:%M:%S')}] {message}", flush=True)
        self.data["log"].append(message)
        self.write()

    def write(self) -> None:
        (self.out / "device_study.json").write_text(json.dumps(self.data, indent=2, default=float))
        (self.out / "throughput.md").write_text(throughput_markdown(self.data))
        if self.data["science"].get("table"):
            (self.out / "science.md").write_text(self.data["science"]["markdown"])


def _torch_rows(record) -> list[dict]:
    """The PyTorch reference's rows with augmentation on (the same work as contrastood's step)."""
    return [r for r in (record or {}).get("results", []) if r.get("passes_s") and r.get("augment", "on") == "on"]


def throughput_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"Device: {meta['device']} ({meta['backend']}), jax {meta['jax']}; {meta['date']}.", "",
             "| framework | model | step | dtype | batch | compile s | step s | img/s | passes/s | MFU | extract img/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["throughput"]:
        lines.append(f"| contrastood (JAX) | {r['model']} | {'CT+LS' if r['views'] == 2 else 'supervised'} | {r['dtype']} | "
                     f"{r['batch']} | {r['compile_s']:.1f} | {r['step_s']:.4f} | {r['img_s']:.0f} | {r['passes_s']:.0f} | "
                     f"{100 * r['mfu']:.1f}% | {r['extract_img_s']:.0f} |")
    torch_result = data.get("torch")
    version = (torch_result or {}).get("meta", {}).get("torch_version", "")
    for r in _torch_rows(torch_result):
        lines.append(f"| PyTorch {version} | {r['model']} | CT+LS | {r['mode_label']} | {r['batch']} | - | "
                     f"{r['step_s']:.4f} | {r['img_s']:.0f} | {r['passes_s']:.0f} | - | - |")
    if torch_result and torch_result.get("ratio"):
        lines += ["", torch_result["ratio"]]
    if torch_result and torch_result.get("error"):
        lines += ["", f"PyTorch reference: {torch_result['error']}"]
    return "\n".join(lines) + "\n"


# Most important first: the target, then what widens the picture.
# The first two are also what the science plan divides its budget by (it trains at that batch and dtype).
THROUGHPUT_PLAN = [
    ("resnet18", "bfloat16", 1024, True), ("resnet18", "bfloat16", 1024, False), ("resnet18", "float32", 1024, True),
    ("resnet18", "bfloat16", 512, True), ("resnet50", "bfloat16", 512, True), ("resnet50", "bfloat16", 1024, True),
    ("resnet50", "float32", 512, True), ("resnet18", "float32", 512, False), ("resnet50", "bfloat16", 512, False),
    ("resnet18", "float32", 1024, False),
]
SMOKE_PLAN = [("resnet_tiny", "float32", 16, True), ("resnet_tiny", "float32", 16, False)]


def measure_throughput(results: Results, budget: Budget, share_end: float, smoke: bool) -> None:
    import train_throughput

    for model, dtype, batch, contrastive in (SMOKE_PLAN if smoke else THROUGHPUT_PLAN):
        if budget.left() < share_end:
            results.note(f"throughput: budget share used up before {model} {dtype} b{batch}")
            break
        started = time.time()
        try:
            row = train_throughput.benchmark(model, batch, 2 if smoke else 10, dtype, contrastive,
                                             eval_batch=64 if smoke else 1000, min_seconds=0.0 if smoke else 3.0)
        except Exception as error:  # pylint: disable=broad-except  # e.g. out of memory: keep the others
            results.note(f"throughput {model} {dtype} b{batch}: failed ({type(error).__name__}: {str(error)[:300]})")
            continue
        row["wall_s"] = time.time() - started
        results.data["throughput"].append(row)
        results.note(f"throughput {model} {dtype} b{batch} {'CT+LS' if contrastive else 'supervised'}: "
                     f"{row['passes_s']:.0f} passes/s, MFU {100 * row['mfu']:.1f}%, compile {row['compile_s']:.0f} s")


def measure_torch(results: Results, budget: Budget, share_end: float, smoke: bool, compile_s: float) -> None:
    available = budget.left() - share_end
    if available < 20 and not smoke:
        results.data["torch"] = {"error": f"skipped: {available:.0f} s left in the throughput share"}
        results.write()
        return
    out = results.out / "torch_reference.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "torch_reference.py"), f"--json={out}", "--augment=on",
               "--repeats=3"]
    if smoke:
        command += ["--models=resnet_tiny", "--batch_size=16", "--steps=2", "--modes=fp32", "--device=cpu"]
    else:
        command += ["--models=resnet18", "--batch_size=1024", "--steps=20", "--modes=bf16_cl,fp32_cl", "--device=cuda"]
        if available > compile_s + 40:
            command += ["--compile", f"--compile_timeout_s={compile_s:.0f}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, available))
        record = json.loads(out.read_text()) if out.exists() else {}
        record["returncode"], record["stdout_tail"] = proc.returncode, proc.stdout[-3000:]
        if proc.returncode:
            record["error"] = f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    except subprocess.TimeoutExpired:
        record = json.loads(out.read_text()) if out.exists() else {}
        record["error"] = f"timed out after {available:.0f} s"
    jax_rows = [r for r in results.data["throughput"] if r["views"] == 2 and r["model"] == ("resnet_tiny" if smoke else "resnet18")
                and r["batch"] == (16 if smoke else 1024)]
    torch_rows = _torch_rows(record)
    if jax_rows and torch_rows:
        best_jax = max(jax_rows, key=lambda r: r["passes_s"])
        best_torch = max(torch_rows, key=lambda r: r["passes_s"])
        record["ratio"] = (f"contrastood {best_jax['dtype']} / PyTorch's best mode ({best_torch['mode_label']}) on the "
                           f"same step: {best_jax['passes_s'] / best_torch['passes_s']:.2f}x "
                           f"({best_jax['passes_s']:.0f} vs {best_torch['passes_s']:.0f} passes/s)")
    results.data["torch"] = record
    results.note(f"PyTorch reference: {record.get('ratio') or record.get('error', 'no result')}")


def step_seconds(results: Results, model: str, dtype: str, batch: int, contrastive: bool) -> float | None:
    rows = [r for r in results.data["throughput"] if (r["model"], r["dtype"], r["batch"], r["views"] == 2) ==
            (model, dtype, batch, contrastive)]
    return rows[0]["step_s"] if rows else None


def plan_science(results: Results, budget: Budget, args, train_size: int) -> dict:
    """Steps per stage so that every planned run ends within the budget; more variants if they fit."""
    model, dtype, batch = ("resnet_tiny", "float32", 16) if args.smoke else ("resnet18", args.science_dtype, args.batch)
    t_ct = step_seconds(results, model, dtype, batch, True)
    t_sup = step_seconds(results, model, dtype, batch, False)
    if t_ct is None or t_sup is None:  # measure both now (they are what the plan divides by)
        import train_throughput

        for contrastive in (True, False):
            if step_seconds(results, model, dtype, batch, contrastive) is None:
                row = train_throughput.benchmark(model, batch, 3, dtype, contrastive, eval_batch=64,
                                                 min_seconds=0.0 if args.smoke else 2.0)
                results.data["throughput"].append(row)
        t_ct = step_seconds(results, model, dtype, batch, True)
        t_sup = step_seconds(results, model, dtype, batch, False)
    overhead = args.run_overhead_s  # compile + evaluation per run, estimated
    available = budget.left() - args.reserve_s
    steps_per_epoch = max(1, train_size // batch)
    chosen = None
    options = [(["supervised", "contrastive+ls"], [0]), (["supervised", "contrastive+ls"], [0, 1]),
               (["supervised", "label_smoothing", "contrastive", "contrastive+ls"], [0])]
    for variants, seeds in options:
        per_step = sum((2 * t_ct if v.startswith("contrastive") else t_sup) for v in variants) * len(seeds)
        steps = int((available - overhead * len(variants) * len(seeds)) / per_step)
        if args.smoke:
            steps = min(steps, 3)
        if chosen is None or steps >= args.min_epochs * steps_per_epoch:
            chosen = {"variants": variants, "seeds": seeds, "steps_per_stage": max(steps, 1 if args.smoke else 0)}
        if steps < args.min_epochs * steps_per_epoch:
            break
    chosen.update(model=model, dtype=dtype, batch=batch, step_s_ct=t_ct, step_s_supervised=t_sup,
                  epochs_per_stage=chosen["steps_per_stage"] / steps_per_epoch, train_images=train_size,
                  seconds_available=available, overhead_per_run_s=overhead)
    results.data["plan"] = chosen
    results.note(f"plan: {chosen['variants']} x seeds {chosen['seeds']}, {chosen['steps_per_stage']} steps per stage "
                 f"({chosen['epochs_per_stage']:.1f} epochs at batch {batch}), {model} {dtype}; "
                 f"{available:.0f} s available")
    return chosen


def run_science(results: Results, budget: Budget, plan: dict, data_dir: pathlib.Path, workdir: pathlib.Path,
                smoke: bool) -> None:
    import ablation

    if plan["steps_per_stage"] <= 0:
        results.note("science: no time left for a single step; skipped")
        return
    settings = {"preset": "device", "model": plan["model"], "dtype": plan["dtype"],
                "batch": plan["batch"], "steps": plan["steps_per_stage"], "data": str(data_dir)}
    if not smoke:  # the paper's CIFAR-10 recipe (App. B) for the contrastive variants and smoothing
        settings.update(class_weight=100.0, temperature=1.0, label_smoothing=0.01)
    reports, workdirs, done_rows = {}, {}, []
    for seed in plan["seeds"]:
        for variant in plan["variants"]:
            if budget.left() < 10:
                results.note(f"science: out of time before {variant} seed {seed}")
                break
            config = ablation.study.get_config(ablation.run_arg(settings, variant=variant, seed=seed))
            run_dir = workdir / f"{variant}_seed{seed}"
            started = time.time()
            report = ablation.run_one(config, run_dir)
            reports[(variant, seed)], workdirs[(variant, seed)] = report, run_dir
            results.data["science"].setdefault("runs", {})[f"{variant}_seed{seed}"] = {
                "wall_s": time.time() - started, "step": report["step"],
                "test_accuracy": report["in_distribution"]["test_accuracy"],
                "auroc": {s: {k: v["auroc"] for k, v in r.items() if isinstance(v, dict)}
                          for s, r in report["results"].items()}}
            results.note(f"science {variant} seed {seed}: accuracy {report['in_distribution']['test_accuracy']:.4f}, "
                         f"{time.time() - started:.0f} s")
    rows = [v for v in plan["variants"] if all((v, s) in reports for s in plan["seeds"])]
    if not rows:
        return
    table = ablation.aggregate(reports, workdirs, plan["seeds"], rows)
    meta = {"sweep": "variants", "preset": settings["preset"], "d_in": "CIFAR-10 0-5", "seeds": plan["seeds"], "steps": plan["steps_per_stage"],
            "model": plan["model"], "width": 1, "batch": plan["batch"], "train_fraction": 1.0,
            "wall_seconds": sum(t["wall_seconds"] for t in table.values()), "machine": results.data["meta"]["device"]}
    results.data["science"]["table"] = table
    results.data["science"]["markdown"] = (f"# Table 2 on {results.data['meta']['device']}, {results.data['meta']['date']}\n\n"
                                           f"{plan['epochs_per_stage']:.1f} epochs per stage.\n\n"
                                           + ablation.markdown(table, meta))
    results.write()


def environment() -> dict:
    import jax

    device = jax.devices()[0]
    return {"device": device.device_kind, "backend": jax.default_backend(), "devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "host": platform.node(), "cpus": os.cpu_count(),
            "tensorflow_importable": _importable("tensorflow"), "clu_importable": _importable("clu")}


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cmd_run(args) -> dict:
    budget = Budget(args.budget_s)
    import jax

    # A rerun on the same (still warm) machine reuses the compiled programs.
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.workdir) / "jax_cache"))
    if args.block_tensorflow:  # what the device image is like: no TensorFlow, tfds or clu
        for name in ("tensorflow", "tensorflow_datasets", "clu"):
            sys.modules[name] = None
    out = pathlib.Path(args.out)
    workdir = pathlib.Path(args.workdir)
    data_dir = workdir / "data"
    manifest = unpack(pathlib.Path(args.pack), data_dir)
    results = Results(out, {**environment(), "budget_s": args.budget_s, "pack": manifest, "args": vars(args),
                            "command": " ".join(sys.argv)})
    results.note(f"start on {results.data['meta']['device']}; unpacked in {time.time() - budget.start:.0f} s")
    throughput_end = args.budget_s * (1 - args.throughput_share)
    measure_throughput(results, budget, throughput_end + args.torch_s, args.smoke)
    measure_torch(results, budget, throughput_end, args.smoke, args.torch_compile_s)
    plan = plan_science(results, budget, args, manifest["sets"]["train"]["count"])
    run_science(results, budget, plan, data_dir, workdir / "runs", args.smoke)
    results.note(f"done in {time.time() - budget.start:.0f} s of a {args.budget_s:.0f} s budget")
    return results.data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="build the data pack from ../shared/data")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / ".device_pack"))
    p.add_argument("--max_mib", type=float, default=56.0, help="the pack's size (the call carries at most 64 MiB)")
    p.add_argument("--limit", type=int, default=0, help="at most this many images per set (tests)")
    r = sub.add_parser("run", help="the study (on the device machine)")
    r.add_argument("--pack", default=str(ROOT / ".device_pack"))
    r.add_argument("--out", required=True, help="results folder ($OUT on the device machine)")
    r.add_argument("--workdir", default="/tmp/device_study", help="local checkpoints and unpacked data")
    r.add_argument("--budget_s", type=float, default=330.0, help="wall seconds for the whole study")
    r.add_argument("--throughput_share", type=float, default=0.45, help="of the budget, PyTorch included")
    r.add_argument("--torch_s", type=float, default=60.0, help="of the throughput share, kept for PyTorch")
    r.add_argument("--torch_compile_s", type=float, default=45.0)
    r.add_argument("--batch", type=int, default=1024, help="science batch (a measured throughput row's)")
    r.add_argument("--science_dtype", default="bfloat16")
    r.add_argument("--min_epochs", type=float, default=15.0, help="add variants/seeds only if each gets this many")
    r.add_argument("--run_overhead_s", type=float, default=45.0, help="compile + evaluation per science run")
    r.add_argument("--reserve_s", type=float, default=10.0, help="kept for writing results at the end")
    r.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps (the tests)")
    r.add_argument("--block_tensorflow", action="store_true", help="make TensorFlow, tfds and clu unimportable")
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack(pathlib.Path(args.data), pathlib.Path(args.out), args.max_mib, args.limit)
        for name, entry in manifest["sets"].items():
            print(f"{name}: {entry['count']} images, {entry['encoding']}, {entry['bytes'] / 2**20:.1f} MiB")
        print(f"total {manifest['total_bytes'] / 2**20:.1f} MiB in {args.out}")
        return manifest
    return cmd_run(args)


if __name__ == "__main__":
    main()

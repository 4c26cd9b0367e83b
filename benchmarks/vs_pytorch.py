r"""contrastood's train step against PyTorch's best CPU mode, side by side in one run on this machine.

  python benchmarks/vs_pytorch.py                                  # tiny + ResNet-18, batch 128
  python benchmarks/vs_pytorch.py --models=resnet_tiny --out=results/cpu_speed
  python benchmarks/vs_pytorch.py --max_isa=AVX2 --out=results/cpu_speed_avx2   # as on an AVX2-only CPU

For each model: contrastood's full step (two SimCLR views, NT-Xent + label-smoothed CE, LARS; the
augmentation inside the step) under every XLA:CPU option set contrastood.perf chooses between, with
XLA's convolutions, with oneDNN's direct ones and with Winograd's (model.conv, where the kernel
builds; the Winograd rows take, per layer shape, the kernel onednn_conv.choose_layers measured faster on this
CPU, as a long training run does), in float32, and in bfloat16 with oneDNN's direct and Winograd F(2x2) ones
where the CPU has bf16 hardware; then
benchmarks/torch_reference.py's same step (augmentation on the device too) in every PyTorch mode this
CPU runs (fp32, fp32 channels_last, bf16 autocast channels_last where the CPU has bf16 hardware), all
in passes/s (views through forward + backward). PyTorch runs twice: with glibc's malloc defaults, and
with contrastood.host_memory's settings through GLIBC_TUNABLES (its CPU allocator faults its step
buffers in afresh too); its best mode is the best of both. One more contrastood row runs the default
kernels and option set in a fresh process with glibc's malloc defaults (CONTRASTOOD_HOST_MALLOC=0), to
show what contrastood.host_memory gains on this machine. Prints the CPU model and vector flags, the MFU
denominator (a measured 1024^2 float32 matmul, beside cores x clock x 32 or 64 FLOP/cycle for
reference), and the ratios: our best row against PyTorch's best mode, and our best float32 row
against its best float32 mode.

Rows measured minutes apart drift on a shared VM (about +-25% here), so each of those two pairs is
then measured again head to head: --rounds alternating rounds of ours (the same compiled step) and
PyTorch's (a fresh torch_reference.py process, 3 warm-up steps, contrastood's malloc settings, with
which a fresh PyTorch process is at its steady speed at once; under glibc's defaults it was still
slower after 20 warm-up steps than after running its other modes), and the ratio is the median of
the rounds' ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def clock_ghz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            rates = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(rates) / 1000 if rates else None
    except OSError:
        return None


def _without_host_malloc(model: str, batch: int, seconds: float, conv: str, options: str) -> dict:
    """train_throughput.benchmark in a fresh process whose glibc keeps its defaults (host_memory off)."""
    code = ("import json, sys; sys.path[:0] = [{root!r}, {bench!r}]; import train_throughput; "
            "from contrastood import perf; "
            "r = train_throughput.benchmark({model!r}, {batch}, 3, 'float32', True, eval_batch=256, "
            "min_seconds={seconds}, options=dict(perf.CPU_CANDIDATES[{options!r}]), conv={conv!r}); "
            "print(json.dumps({{'passes_s': r['passes_s'], 'mfu': r['mfu']}}))").format(
                root=str(ROOT), bench=str(ROOT / "benchmarks"), model=model, batch=batch, seconds=seconds,
                options=options, conv=conv)
    env = {**os.environ, "CONTRASTOOD_HOST_MALLOC": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet_tiny,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per JAX row (at least 3 steps)")
    parser.add_argument("--torch_steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating head-to-head rounds per pair (0: none)")
    parser.add_argument("--out", default="", help="also write vs_pytorch.{json,md} there")
    parser.add_argument("--max_isa", default="", choices=[""] + sorted(ISA_CAPS),
                        help="run both frameworks as on a CPU with only this oneDNN ISA level (AVX2: an AVX2-only "
                        "CPU on an AVX-512 one); see ISA_CAPS for what it caps and what it cannot")
    args = parser.parse_args(argv)
    if args.max_isa:
        cap_isa(args.max_isa)
    import train_throughput  # first: it configures contrastood.host_memory before JAX starts
    import jax

    from contrastood import cpu_isa, host_memory, onednn_conv, perf

    identity = perf.cpu_identity()
    matmul = perf.measured_matmul_flops("float32")
    bf16 = perf.cpu_has_bf16()
    bf16_peak, bf16_source = perf.peak_flops_per_device("bfloat16") if bf16 else (0.0, "")
    bf16_peak *= jax.device_count()
    ghz = clock_ghz()
    cap = cpu_isa.cap()
    xla_cap = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))  # as set, by --max_isa or not
    capped = (f" [ISA capped at {cap}: ONEDNN_MAX_CPU_ISA (oneDNN, ours and PyTorch's), XLA_FLAGS "
              f"--xla_cpu_max_isa={xla_cap.group(1) if xla_cap else '(unset)'}, ATEN_CPU_CAPABILITY="
              f"{os.environ.get('ATEN_CPU_CAPABILITY', '(unset)')}; the package's own C++ kernels (target_clones) "
              "and YNNPACK still pick their code by CPUID]" if cap else "")
    print(f"CPU {identity['cpu']} ({identity['cores']} cores; {identity['isa']}){capped}, jax {jax.__version__}, "
          f"{jax.device_count()} device(s); host malloc: {host_memory.state['reason']}")
    print(f"MFU denominator: measured 1024^2 float32 matmul {matmul / 1e12:.3f} TFLOP/s"
          + (f"; nominal cores x {ghz:.2f} GHz x 32 FLOP/cycle (two 256-bit FMA units) = "
             f"{int(identity['cores']) * ghz * 32 / 1e3:.3f} TFLOP/s, x 64 (two 512-bit) = "
             f"{int(identity['cores']) * ghz * 64 / 1e3:.3f} (MFU uses the measured rate)" if ghz else "")
          + (f"; bfloat16 rows: {bf16_peak / 1e12:.3f} TFLOP/s ({bf16_source.rsplit(' / ', 1)[0]})"
             if bf16 else "")
          + (f"; nominal AMX bf16: cores x {ghz:.2f} GHz x 1024 FLOP/cycle = "
             f"{int(identity['cores']) * ghz * 1024 / 1e3:.2f} TFLOP/s"
             if ghz and "amx_bf16" in identity["isa"] else "")
          + "; FLOPs are model FLOPs: a Winograd layer counts as the direct convolution it replaces, with 4x "
          "(float32 F(4x4)) or 2.25x (bfloat16 F(2x2)) the multiplications it does, so its rows' MFU can pass 100%", flush=True)
    convs = ["xla"] + (["onednn", "winograd"] if onednn_conv.load() is None else [])
    print(f"convolution kernels: {', '.join(convs)}"
          + ("" if "onednn" in convs else f" (oneDNN: {onednn_conv.load()})")
          + f"; bfloat16 rows: {'yes' if bf16 else 'no (no avx512_bf16/amx_bf16' + (' under the cap)' if cap else ')')}", flush=True)
    rows = []
    for model in args.models.split(","):
        bf16_convs = ["onednn", "winograd"] if bf16 and "onednn" in convs else []
        for dtype, conv in [("float32", c) for c in convs] + [("bfloat16", c) for c in bf16_convs]:
            for name, options in perf.CPU_CANDIDATES.items():
                r = train_throughput.benchmark(model, args.batch, 3, dtype, True, eval_batch=256,
                                               min_seconds=args.seconds, options=dict(options), conv=conv)
                rows.append({"framework": "contrastood", "model": model, "mode": f"{dtype}, conv {conv}, XLA {name}",
                             "passes_s": r["passes_s"], "mfu": r["mfu"], "dtype": dtype, "conv": conv,
                             "options": name})
                print(json.dumps(rows[-1]), flush=True)
        if host_memory.state["applied"]:
            conv = convs[-1]
            default_name = perf.DEFAULT_CANDIDATE[conv]
            r = _without_host_malloc(model, args.batch, args.seconds, conv, default_name)
            rows.append({"framework": "contrastood", "model": model, "mode": f"float32, conv {conv}, XLA {default_name}, "
                         "glibc malloc defaults (CONTRASTOOD_HOST_MALLOC=0)", "passes_s": r["passes_s"],
                         "mfu": r["mfu"], "host_malloc": False})
            print(json.dumps(rows[-1]), flush=True)
    for malloc in TORCH_MALLOC:
        torch_record = _torch(args.models, None, args.batch, args.torch_steps, repeats=2, malloc=malloc)
        for r in torch_record["results"]:
            rows.append({"framework": f"PyTorch {torch_record['meta']['torch_version']}", "model": r["model"],
                         "mode": r["mode_label"] + TORCH_MALLOC[malloc], "passes_s": r["passes_s"], "mfu": None,
                         "torch_mode": r["mode_label"], "malloc": malloc})
    lines = [f"CPU: {identity['cpu']}, {identity['cores']} cores, {identity['isa']}{capped}; jax {jax.__version__}, "
             f"PyTorch {torch_record['meta']['torch_version']}; batch {args.batch}, full two-view step with the "
             f"augmentation; {time.strftime('%Y-%m-%d')}.", "",
             "| model | contrastood best (mode) | PyTorch best (mode) | ratio to best | contrastood best float32 (mode) | "
             "PyTorch best float32 (mode) | ratio, float32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for model in args.models.split(","):
        mine = [r for r in rows if r["model"] == model and r["framework"] == "contrastood" and r.get("host_malloc", True)]
        ours = max(mine, key=lambda r: r["passes_s"])
        ours32 = max((r for r in mine if r["mode"].startswith("float32")), key=lambda r: r["passes_s"])
        theirs = [r for r in rows if r["model"] == model and r["framework"] != "contrastood"]
        best = max(theirs, key=lambda r: r["passes_s"])
        best32 = max((r for r in theirs if not r["mode"].startswith("bf16")), key=lambda r: r["passes_s"])
        summary[model] = {"ours": ours, "ours_float32": ours32, "pytorch_best": best, "pytorch_best_float32": best32,
                          "ratio": ours["passes_s"] / best["passes_s"],
                          "ratio_float32": ours32["passes_s"] / best32["passes_s"]}
        lines.append(f"| {model} | {ours['passes_s']:.1f} ({ours['mode']}) | {best['passes_s']:.1f} ({best['mode']}) | "
                     f"{summary[model]['ratio']:.2f}x | {ours32['passes_s']:.1f} ({ours32['mode']}) | "
                     f"{best32['passes_s']:.1f} ({best32['mode']}) | {summary[model]['ratio_float32']:.2f}x |")
    if args.rounds > 0:
        lines += ["", f"Head to head, alternating rounds per pair ({args.rounds} of each: ours, then PyTorch, then ours ...); "
                  "ratio = median of the rounds' ratios:", "",
                  "| model | pair | contrastood passes/s per round | PyTorch passes/s per round | ratios | median |",
                  "|---|---|---|---|---|---:|"]
        for model in args.models.split(","):
            for pair, ours_key, theirs_key in [("best", "ours", "pytorch_best"),
                                                ("float32", "ours_float32", "pytorch_best_float32")]:
                r = _head_to_head(model, summary[model][ours_key], summary[model][theirs_key], args)
                summary[model][f"head_to_head_{pair}"] = r
                lines.append(f"| {model} | {pair}: {r['ours_mode']} against {r['pytorch_mode']} | "
                             f"{', '.join(f'{v:.1f}' for v in r['ours'])} | {', '.join(f'{v:.1f}' for v in r['pytorch'])} | "
                             f"{', '.join(f'{v:.2f}x' for v in r['ratios'])} | {r['median_ratio']:.2f}x |")
                print(lines[-1], flush=True)
    lines += ["", "| framework | model | mode | passes/s | MFU |", "|---|---|---|---:|---:|"]
    for r in rows:
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['framework']} | {r['model']} | {r['mode']} | {r['passes_s']:.1f} | {mfu} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        target = pathlib.Path(args.out)
        target.mkdir(parents=True, exist_ok=True)
        (target / "vs_pytorch.json").write_text(json.dumps({"identity": identity, "matmul_flops": matmul,
                                                            "clock_ghz": ghz, "rows": rows, "summary": summary,
                                                            "torch": torch_record["meta"]}, indent=2))
        (target / "vs_pytorch.md").write_text(text)
    return summary


# --max_isa: oneDNN ISA level -> (XLA's --xla_cpu_max_isa, PyTorch's ATEN_CPU_CAPABILITY). Together with
# ONEDNN_MAX_CPU_ISA (oneDNN's convolutions and matmuls in both frameworks, and contrastood.cpu_isa, which
# takes the bf16 paths away) they cap every kernel library whose code the two steps spend their time in but two:
# the package's C++ kernels (norm_act, channel_sums, the Winograd transforms: target_clones, dispatched by
# CPUID) and YNNPACK's fusions. On a CPU that double-pumps 512-bit vectors (AMD Zen 4) their float32 code runs at
# the AVX2 rate anyway; on others those kernels run somewhat faster than on a true AVX2-only CPU.
ISA_CAPS = {"AVX2": ("AVX2", "avx2"), "AVX512_CORE": ("AVX512", "avx512"),
            "AVX512_CORE_VNNI": ("AVX512_VNNI", "avx512"), "AVX512_CORE_BF16": ("AVX512_BF16", "avx512")}


def cap_isa(level: str) -> None:
    """Sets the caps of ISA_CAPS[level] in this process's environment (children inherit it). Before JAX starts:
    XLA reads its flags, oneDNN its ISA cap, once."""
    if "jax" in sys.modules:
        raise RuntimeError("--max_isa must be applied before JAX is imported; run benchmarks/vs_pytorch.py as a script")
    xla, aten = ISA_CAPS[level]
    os.environ["ONEDNN_MAX_CPU_ISA"] = level
    os.environ["ATEN_CPU_CAPABILITY"] = aten
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), f"--xla_cpu_max_isa={xla}"]))


# PyTorch's malloc settings -> the suffix of its rows' modes
TORCH_MALLOC = {"glibc": "", "contrastood": ", malloc as contrastood's"}


def _torch(models: str, modes: str | None, batch: int, steps: int, repeats: int, malloc: str,
           warmup: int | None = None) -> dict:
    """benchmarks/torch_reference.py's record (augmentation on) from a fresh process whose glibc malloc keeps
    its defaults (malloc="glibc") or takes contrastood.host_memory's settings ("contrastood")."""
    from contrastood import host_memory

    env = dict(os.environ)
    if malloc == "contrastood":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), host_memory.GLIBC_TUNABLES]))
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_reference.py"), f"--models={models}",
                        f"--batch_size={batch}", f"--steps={steps}", f"--repeats={repeats}", "--augment=on",
                        f"--json={out}"] + ([f"--modes={modes}"] if modes else [])
                       + ([f"--warmup={warmup}"] if warmup is not None else []), check=True, timeout=3600,
                       env=env)
        return json.loads(out.read_text())


def _head_to_head(model: str, ours: dict, theirs: dict, args) -> dict:
    """Alternating rounds of our row's step (compiled once) and PyTorch's mode, so both see the same drift."""
    import train_throughput
    from contrastood import perf

    step = train_throughput.build_step(model, args.batch, ours["dtype"], True, 32,
                                       dict(perf.CPU_CANDIDATES[ours["options"]]), ours["conv"])
    mine, pytorch = [], []
    for _ in range(args.rounds):
        seconds, step["state"] = train_throughput.time_steps(lambda s: step["compiled"](s, step["data"]),
                                                             step["state"], 3, args.seconds)
        mine.append(2 * args.batch / seconds)
        pytorch.append(_torch(model, theirs["torch_mode"], args.batch, args.torch_steps, repeats=1,
                              malloc="contrastood", warmup=3)["results"][0]["passes_s"])
    ratios = [a / b for a, b in zip(mine, pytorch)]
    return {"model": model, "ours_mode": ours["mode"],
            "pytorch_mode": theirs["torch_mode"] + TORCH_MALLOC["contrastood"], "ours": mine, "pytorch": pytorch,
            "ratios": ratios, "median_ratio": float(sorted(ratios)[len(ratios) // 2])}


if __name__ == "__main__":
    main()

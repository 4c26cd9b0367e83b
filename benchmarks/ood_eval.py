"""Benchmark: class-conditional Gaussian OOD scoring vs a plain NumPy / scikit-learn per-class reference.

Fits one Ledoit-Wolf Gaussian per class on N x d synthetic train features and scores M test features
(max_c log N(z; mu_c, Sigma_c), Winkens et al. Eq. 2) with
  * contrastood.ood.scorers (thin eigen factors + Woodbury when n_c < d, JAX, float64), and
  * the reference: per class sklearn.covariance.ledoit_wolf, np.linalg.cholesky, and
    scipy.linalg.solve_triangular on the centred test features (float64).

Each method runs in its own subprocess so that its peak RSS (resource.getrusage) is its own. The
reference costs O(d^3 + M d^2) per class (15-30 s per class at d=6144, M=20000 on 2 CPU cores), so at
C > --reference-classes it runs on the first `--reference-classes` classes only and its time is scaled
by C / reference_classes (its classes are independent and equal-sized, so the cost is linear in C); the
table says when it did. Scores are compared on those classes: every per-class log density, and the max
over them with its argmax. Times include JAX compilation.

    python benchmarks/ood_eval.py --sizes small   # ~1-2 minutes on 2 CPU cores
    python benchmarks/ood_eval.py --sizes full    # N=50,000, M=20,000: several minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZES = {
    # name: list of (dim, num_classes, num_train, num_test)
    "small": [(512, 10, 5_000, 2_000), (6144, 100, 10_000, 2_000)],
    "full": [(512, 10, 50_000, 20_000), (6144, 100, 50_000, 20_000)],
}


def synthetic_features(dim: int, num_classes: int, num_train: int, num_test: int, seed: int):
    """Class-structured float32 features: class means, per-class low-rank correlations, anisotropic noise.

    Test features are half in-distribution draws and half from shifted means (OOD-like).
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)).astype(np.float32)
    factors = (rng.normal(size=(num_classes, 16, dim)) / 4.0).astype(np.float32)
    noise_scale = rng.uniform(0.1, 1.0, size=dim).astype(np.float32)

    def draw(labels, shift):
        out = rng.standard_normal((len(labels), dim), dtype=np.float32) * noise_scale
        out += means[labels] + shift
        for c in range(num_classes):
            rows = np.flatnonzero(labels == c)
            out[rows] += rng.standard_normal((len(rows), 16), dtype=np.float32) @ factors[c]
        return out

    train_labels = np.arange(num_train) % num_classes
    test_labels = rng.integers(0, num_classes, num_test)
    shift = np.zeros((num_test, dim), np.float32)
    shift[num_test // 2:] = rng.normal(scale=0.5, size=(num_test - num_test // 2, dim))
    train = draw(train_labels, 0.0)
    test = draw(test_labels, shift)
    return train, train_labels, test


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


class _Timer:
    """Accumulates wall and process CPU seconds (all threads) per phase: `with timer("fit"): ...`.

    CPU seconds are reported next to wall time because this machine is shared: other jobs stretch wall
    time, while CPU time tracks the work done (spin-waiting BLAS threads still count in both).
    """

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._phase = None

    def __call__(self, phase: str):
        self._phase = phase
        return self

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        self.totals[f"{self._phase}_s"] = self.totals.get(f"{self._phase}_s", 0.0) + wall
        self.totals[f"{self._phase}_cpu_s"] = self.totals.get(f"{self._phase}_cpu_s", 0.0) + cpu


def run_ours(config: dict) -> tuple[dict, np.ndarray]:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from contrastood.ood import scorers

    train, labels, test = synthetic_features(**config["data"])
    data_rss = _peak_rss_gb()
    timer = _Timer()
    with timer("fit"):
        params = scorers.fit_gaussians(train, labels, config["data"]["num_classes"], shrinkage="ledoit_wolf")
    with timer("score"):
        log_densities = scorers.gaussian_log_densities(params, test)
    stats = {**timer.totals, "peak_rss_gb": _peak_rss_gb(), "data_rss_gb": data_rss,
             "rank": params.components.shape[1]}
    return stats, log_densities[:, :config["reference_classes"]]


def run_reference(config: dict) -> tuple[dict, np.ndarray]:
    import scipy.linalg
    from sklearn.covariance import ledoit_wolf

    train, labels, test = synthetic_features(**config["data"])
    data_rss = _peak_rss_gb()
    dim = train.shape[1]
    test64 = test.astype(np.float64)
    columns, timer = [], _Timer()
    for c in range(config["reference_classes"]):
        with timer("fit"):
            class_features = train[labels == c].astype(np.float64)
            mean = class_features.mean(axis=0)
            cov, _ = ledoit_wolf(class_features)
            cholesky = np.linalg.cholesky(cov)
            log_det = 2.0 * np.sum(np.log(np.diag(cholesky)))
        with timer("score"):
            whitened = scipy.linalg.solve_triangular(cholesky, (test64 - mean).T, lower=True,
                                                     check_finite=False)
            columns.append(-0.5 * (np.sum(whitened ** 2, axis=0) + log_det + dim * math.log(2 * math.pi)))
        del cov, cholesky, whitened
    stats = {**timer.totals, "peak_rss_gb": _peak_rss_gb(), "data_rss_gb": data_rss}
    return stats, np.stack(columns, axis=1)


def _spawn(method: str, config: dict, workdir: pathlib.Path) -> tuple[dict, np.ndarray]:
    out = workdir / f"{method}.npy"
    load_before = os.getloadavg()[0]
    result = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--config", json.dumps(config), "--out", str(out)],
        check=True, capture_output=True, text=True)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    stats["load_avg"] = (load_before, os.getloadavg()[0])
    return stats, np.load(out)


def benchmark(dim: int, num_classes: int, num_train: int, num_test: int, reference_classes: int,
              seed: int) -> dict:
    reference_classes = min(reference_classes, num_classes)
    config = {"data": {"dim": dim, "num_classes": num_classes, "num_train": num_train, "num_test": num_test,
                       "seed": seed},
              "reference_classes": reference_classes}
    with tempfile.TemporaryDirectory() as workdir:
        ours, ours_columns = _spawn("ours", config, pathlib.Path(workdir))
        reference, reference_columns = _spawn("reference", config, pathlib.Path(workdir))
    scale = num_classes / reference_classes
    reference_total = scale * (reference["fit_s"] + reference["score_s"])
    ours_total = ours["fit_s"] + ours["score_s"]
    reference_cpu = scale * (reference["fit_cpu_s"] + reference["score_cpu_s"])
    ours_cpu = ours["fit_cpu_s"] + ours["score_cpu_s"]
    return {
        "config": config, "ours": ours, "reference": reference, "reference_scale": scale,
        "reference_total_s": reference_total, "speedup": reference_total / ours_total,
        "ours_cpu_s": ours_cpu, "reference_cpu_s": reference_cpu, "cpu_speedup": reference_cpu / ours_cpu,
        "max_abs_diff_log_density": float(np.abs(ours_columns - reference_columns).max()),
        "max_abs_diff_score": float(np.abs(ours_columns.max(1) - reference_columns.max(1)).max()),
        "max_rel_diff_score": float((np.abs(ours_columns.max(1) - reference_columns.max(1))
                                     / np.abs(reference_columns.max(1))).max()),
        "argmax_agreement": float(np.mean(ours_columns.argmax(1) == reference_columns.argmax(1))),
        "score_magnitude": float(np.abs(reference_columns).max()),
    }


def print_table(results: list[dict]) -> None:
    header = (f"{'d':>5} {'C':>4} {'N':>6} {'M':>6} | {'ours fit':>8} {'score':>7} {'total':>7} {'RSS GB':>6} | "
              f"{'ref fit':>8} {'score':>8} {'total':>8} {'RSS GB':>6} | {'speedup':>7} {'(CPU)':>6} | "
              f"{'max|dlogp|':>10} {'max rel':>8} {'argmax':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        data, ours, ref, scale = r["config"]["data"], r["ours"], r["reference"], r["reference_scale"]
        print(f"{data['dim']:>5} {data['num_classes']:>4} {data['num_train']:>6} {data['num_test']:>6} | "
              f"{ours['fit_s']:>7.1f}s {ours['score_s']:>6.1f}s {ours['fit_s'] + ours['score_s']:>6.1f}s "
              f"{ours['peak_rss_gb']:>6.2f} | "
              f"{scale * ref['fit_s']:>7.1f}s {scale * ref['score_s']:>7.1f}s {r['reference_total_s']:>7.1f}s "
              f"{ref['peak_rss_gb']:>6.2f} | {r['speedup']:>6.1f}x {r['cpu_speedup']:>5.1f}x | "
              f"{r['max_abs_diff_log_density']:>10.2e} {r['max_rel_diff_score']:>8.1e} {r['argmax_agreement']:>6.3f}")
    print("\nTimes are wall seconds (JAX compilation included); speedup = reference total / ours total, "
          "(CPU) the same ratio in process CPU seconds.\nRSS GB = peak resident memory of the process, data "
          "included. max|dlogp| = max abs difference of per-class log densities; max rel = of the max-over-"
          "classes score; argmax = agreement of the most activated class.")
    for r in results:
        data, ours, ref, k = r["config"]["data"], r["ours"], r["reference"], r["config"]["reference_classes"]
        scaled = r["reference_scale"] != 1
        note = (f"reference run on {k}/{data['num_classes']} classes, its times x{r['reference_scale']:g}"
                if scaled else "reference run on all classes")
        print(f"- d={data['dim']}, C={data['num_classes']}: {note}; diffs over those {k} classes "
              f"(|log density| up to {r['score_magnitude']:.3g}); factor width r={ours['rank']}; "
              f"RSS after making the data: ours {ours['data_rss_gb']:.2f} GB, ref {ref['data_rss_gb']:.2f} GB; "
              f"CPU s: ours {r['ours_cpu_s']:.0f}, ref {r['reference_cpu_s']:.0f}; 1-min load average "
              f"before/after: ours {_pair(ours['load_avg'])}, ref {_pair(ref['load_avg'])} on {os.cpu_count()} CPUs.")


def _pair(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="small")
    parser.add_argument("--reference-classes", type=int, default=10,
                        help="classes the O(d^3) reference runs on; its time is scaled to all classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        config = json.loads(args.config)
        stats, columns = (run_ours if args.worker == "ours" else run_reference)(config)
        np.save(args.out, columns)
        print(json.dumps(stats))
        return
    if args.reference_classes < 1:
        parser.error("--reference-classes must be >= 1")
    results = []
    for dim, num_classes, num_train, num_test in SIZES[args.sizes]:
        results.append(benchmark(dim, num_classes, num_train, num_test, args.reference_classes, args.seed))
        print(f"done d={dim} C={num_classes}", file=sys.stderr, flush=True)
    print_table(results)


if __name__ == "__main__":
    main()

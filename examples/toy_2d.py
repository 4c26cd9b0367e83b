r"""The 2-D toy of Winkens et al. 2020, Figure 2: supervised features can be blind to an input dimension.

  python examples/toy_2d.py --out=/tmp/toy_2d                 # default size, well under a minute on 2 CPU cores
  python examples/toy_2d.py --out=/tmp/toy_2d_tiny --tiny     # a few seconds (what tests/test_toy_2d.py runs)

Why. The paper's Figure 2 argues that a network trained only to classify has no incentive to keep input
directions the labels do not need, so a density fitted to its features z cannot flag inputs that differ
only along such a direction; adding SimCLR's contrastive loss (tell every training point apart from the
others, up to a class-preserving augmentation) keeps z sensitive to them. Here two classes in (x1, x2)
differ in x1 alone (x1 ~ N(-+offset, x1_std^2) per class, x2 ~ N(0, x2_std^2) for both), and the
out-of-distribution points have the same x1 distribution but x2 shifted by +-ood_shift (random sign).

What it trains. Two models with the same architecture, the same initial parameters, the same
mini-batches and the same augmented views (Gaussian jitter of both coordinates, two views per point);
only the loss differs:
  (a) supervised: label-smoothed softmax cross-entropy through a linear head on z, averaged over both views;
  (b) contrastive + supervised: `nt_xent` (SimCLR's NT-Xent, Eq. 1) on a 2-layer projection of z plus
      lambda times the same cross-entropy (L_con + lambda L_class, trained jointly from scratch).
The encoder f is an MLP 2 -> hidden -> z (linear output; z is the "penultimate activation" the head reads).

How it scores. Per-class Gaussians are fitted to the clean training features (`fit_gaussians`, default
Ledoit-Wolf shrinkage) and every input is scored by Eq. 2, s(z) = max_c log N(z; mu_c, Sigma_c)
(`gaussian_score`). The figure shows s(f(x)) over a grid of the input plane for both models side by side,
training points and a sample of OOD points overlaid, white contours enclosing 50 / 90 / 99 % of the
training points (score quantiles, so the panels are comparable although their log densities are not);
each title carries the AUROC (`auroc`: held-out in-distribution test points vs OOD points). The JSON also
gives the same Gaussian score fitted in the input space itself, a reference for how separable the OOD
points are before any network is involved.

How the hyper-parameters were chosen. Without looking at any OOD number: the data, architecture,
optimiser (AdamW with optax's default weight decay 1e-4, warm-up + cosine), temperature (0.5, SimCLR's
CIFAR value), label smoothing (0.01, the paper's CIFAR-10 value), lambda = 1, jitter (0.1, a fifth of the
smallest within-class spread) and the OOD shift were fixed a priori; the learning rate (1e-2 of
{1e-3, 3e-3, 1e-2}: the lowest final training loss of the contrastive model; the supervised loss sits at
its label-smoothing floor for 3e-3 and 1e-2) and the 2000 steps were picked from the training losses
and the in-distribution test accuracy of both models only (both reach 100 % test accuracy; the losses
have flattened by the last steps). Everything is deterministic from --seed (data from numpy, training
from jax.random; two runs give byte-identical PNGs).

Outcome at the default size (2-core CPU: ~15 s idle, 30-40 s with the cores shared): the paper's qualitative claim does
NOT show with these a-priori settings. Seeds 0-4 give supervised AUROC 0.975 / 0.993 / 0.989 / 0.989 /
0.991 and contrastive 0.992 / 0.993 / 0.992 / 0.991 / 0.993, against 0.99 for the Gaussian fitted to the
raw inputs; an untrained network (--steps=1) already scores 0.99. The supervised loss has no incentive
to keep x2, but nothing removes the x2 dependence a random initialisation puts into z either, and the
Gaussian score whitens z, so a small leftover x2 direction is as useful as a large one.
Post-hoc sensitivity (chosen AFTER seeing OOD numbers, so not the default): with strong decoupled
weight decay, --weight-decay=1 (lr * wd = 1e-2 per step), the unused weights decay, the supervised
panel becomes vertical bands as in the paper's Fig. 2 left and its AUROC drops to 0.63 / 0.62 / 0.51 /
0.52 / 0.53 (seeds 0-4) while contrastive stays at 0.99 and both keep 100 % test accuracy (--weight-decay=0:
same as the default). In-distribution losses would not have picked it (the supervised loss is at its
floor for every weight decay up to 0.3 and slightly above it at 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from contrastood.losses import nt_xent, smoothed_cross_entropy  # noqa: E402
from contrastood.ood.metrics import auroc  # noqa: E402
from contrastood.ood.scorers import fit_gaussians, gaussian_score  # noqa: E402

METHODS = ("supervised", "contrastive")
TITLES = {"supervised": "Supervised only (L_class)", "contrastive": "Contrastive + supervised (L_con + λ L_class)"}


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    # Data: class c in {0, 1} has x1 ~ N((2c - 1) * class_offset, x1_std^2), x2 ~ N(0, x2_std^2).
    n_train: int = 512
    n_test: int = 1024
    n_ood: int = 1024
    class_offset: float = 2.0
    x1_std: float = 0.5
    x2_std: float = 1.0
    ood_shift: float = 4.0  # OOD: same x1 distribution, x2 + (+-ood_shift), random sign.
    # Model.
    hidden: tuple[int, ...] = (64, 64)
    z_dim: int = 8
    proj_hidden: int = 64
    proj_dim: int = 16
    # Training (identical for both models apart from the loss).
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-2
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    jitter_std: float = 0.1
    temperature: float = 0.5
    class_weight: float = 1.0  # lambda in L_con + lambda L_class.
    label_smoothing: float = 0.01
    # Figure.
    grid_size: int = 200
    grid_x1: tuple[float, float] = (-4.5, 4.5)
    grid_x2: tuple[float, float] = (-7.5, 7.5)


TINY = dict(n_train=256, n_test=256, n_ood=256, steps=300, batch_size=128, grid_size=60)


# ----------------------------------------------------------------------------------------------------
# Data.


def make_data(config: ToyConfig, seed: int) -> dict[str, np.ndarray]:
    """Training, in-distribution test and OOD points (float32 [N, 2]) with labels for the first two."""
    rng = np.random.default_rng(seed)

    def in_distribution(n):
        labels = np.arange(n) % 2
        rng.shuffle(labels)
        x1 = rng.normal((2 * labels - 1) * config.class_offset, config.x1_std)
        x2 = rng.normal(0.0, config.x2_std, size=n)
        return np.stack([x1, x2], axis=1).astype(np.float32), labels.astype(np.int32)

    x_train, y_train = in_distribution(config.n_train)
    x_test, y_test = in_distribution(config.n_test)
    x_ood, _ = in_distribution(config.n_ood)
    x_ood[:, 1] += config.ood_shift * rng.choice([-1.0, 1.0], size=config.n_ood)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, x_ood=x_ood)


# ----------------------------------------------------------------------------------------------------
# Model and training.


class ToyNet(nn.Module):
    """Encoder f (MLP, linear output z), linear class head g, 2-layer projection head h."""

    hidden: tuple[int, ...]
    z_dim: int
    proj_hidden: int
    proj_dim: int
    num_classes: int = 2

    @nn.compact
    def __call__(self, x):
        h = x
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"encoder_{i}")(h))
        z = nn.Dense(self.z_dim, name="encoder_out")(h)
        logits = nn.Dense(self.num_classes, name="class_head")(z)
        projection = nn.Dense(self.proj_dim, name="proj_1")(nn.relu(nn.Dense(self.proj_hidden, name="proj_0")(z)))
        return z, logits, projection


def make_model(config: ToyConfig) -> ToyNet:
    return ToyNet(hidden=tuple(config.hidden), z_dim=config.z_dim, proj_hidden=config.proj_hidden,
                  proj_dim=config.proj_dim)


def make_optimizer(config: ToyConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(1, int(config.warmup_fraction * config.steps)), max(2, config.steps))
    return optax.adamw(schedule, weight_decay=config.weight_decay)


@functools.lru_cache(maxsize=8)
def _compiled_trainer(config: ToyConfig):
    """One jitted training loop (lax.scan over every step) shared by both methods.

    The method enters as a traced weight on L_con (0 or 1), so the second model reuses the first's
    compilation; the supervised model computes but ignores the contrastive term (its value is logged).
    """
    model = make_model(config)
    optimizer = make_optimizer(config)
    batch = min(config.batch_size, config.n_train)

    def loss_fn(params, views, labels, con_weight, class_weight):
        _, logits, projections = model.apply(params, views)  # views: [2B, 2], view 0 then view 1.
        class_loss, class_acc = smoothed_cross_entropy(logits, jnp.concatenate([labels, labels]),
                                                       config.label_smoothing)
        con_loss, con_acc = nt_xent(projections[:batch], projections[batch:], config.temperature)
        loss = con_weight * con_loss + class_weight * class_loss
        return loss, dict(loss=loss, class_loss=class_loss, class_accuracy=class_acc,
                          contrastive_loss=con_loss, contrastive_accuracy=con_acc)

    @jax.jit
    def run(params, x_train, y_train, data_key, con_weight, class_weight):
        n = x_train.shape[0]

        def step(carry, step_index):
            params, opt_state = carry
            key = jax.random.fold_in(data_key, step_index)
            batch_key, noise_key = jax.random.split(key)
            index = jax.random.choice(batch_key, n, (batch,), replace=False)
            x = x_train[index]
            views = jnp.concatenate([x, x]) + config.jitter_std * jax.random.normal(noise_key, (2 * batch, 2))
            grads, metrics = jax.grad(loss_fn, has_aux=True)(params, views, y_train[index], con_weight,
                                                             class_weight)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        (params, _), metrics = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(config.steps))
        return params, metrics

    return model, run


def train(config: ToyConfig, method: str, x_train: np.ndarray, y_train: np.ndarray, seed: int):
    """Trains one model; returns (params, per-step metrics as numpy arrays).

    The initial parameters, mini-batches and augmentation noise depend on the seed only, not on `method`,
    so the two models differ by their loss alone: L_class (supervised) or L_con + lambda L_class.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x_train.shape[0] != config.n_train:
        raise ValueError(f"expected {config.n_train} training points, got {x_train.shape[0]}")
    model, run = _compiled_trainer(config)
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key, jnp.zeros((1, 2), jnp.float32))
    con_weight, class_weight = (1.0, config.class_weight) if method == "contrastive" else (0.0, 1.0)
    params, metrics = run(params, jnp.asarray(x_train), jnp.asarray(y_train), data_key,
                          jnp.float32(con_weight), jnp.float32(class_weight))
    return params, jax.tree_util.tree_map(np.asarray, metrics)


@functools.lru_cache(maxsize=8)
def _compiled_apply(config: ToyConfig):
    return jax.jit(make_model(config).apply)


def features_and_logits(config: ToyConfig, params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, logits, _ = _compiled_apply(config)(params, jnp.asarray(x))
    return np.asarray(z, np.float64), np.asarray(logits)


# ----------------------------------------------------------------------------------------------------
# Evaluation and figure.


def grid(config: ToyConfig):
    g1 = np.linspace(*config.grid_x1, config.grid_size)
    g2 = np.linspace(*config.grid_x2, config.grid_size)
    mesh1, mesh2 = np.meshgrid(g1, g2)  # [x2, x1] layout, as imshow expects.
    return mesh1, mesh2, np.stack([mesh1.ravel(), mesh2.ravel()], axis=1).astype(np.float32)


def evaluate(config: ToyConfig, params, data: dict[str, np.ndarray], grid_points: np.ndarray) -> dict:
    """Gaussian-score AUROC, accuracies and the score over the grid for one trained model."""
    parts = {"train": data["x_train"], "test": data["x_test"], "ood": data["x_ood"], "grid": grid_points}
    bounds = np.cumsum([0] + [len(v) for v in parts.values()])
    z_all, logits_all = features_and_logits(config, params, np.concatenate(list(parts.values())))
    z = {name: z_all[a:b] for name, a, b in zip(parts, bounds[:-1], bounds[1:])}
    logits = {name: logits_all[a:b] for name, a, b in zip(parts, bounds[:-1], bounds[1:])}
    gaussians = fit_gaussians(z["train"], data["y_train"], 2)  # clean (unaugmented) training features
    s_all, _ = gaussian_score(gaussians, z_all)
    s = {name: s_all[a:b] for name, a, b in zip(parts, bounds[:-1], bounds[1:])}
    return dict(
        auroc=auroc(s["test"], s["ood"]),
        train_accuracy=float(np.mean(np.argmax(logits["train"], -1) == data["y_train"])),
        test_accuracy=float(np.mean(np.argmax(logits["test"], -1) == data["y_test"])),
        s_train=s["train"], s_grid=s["grid"])


def input_space_reference(data: dict[str, np.ndarray]) -> float:
    """AUROC of the same per-class Gaussian score fitted to the raw inputs x (no network)."""
    gaussians = fit_gaussians(data["x_train"].astype(np.float64), data["y_train"], 2)
    return auroc(gaussian_score(gaussians, data["x_test"].astype(np.float64))[0],
                 gaussian_score(gaussians, data["x_ood"].astype(np.float64))[0])


def plot(config: ToyConfig, data: dict[str, np.ndarray], results: dict[str, dict], path: pathlib.Path) -> None:
    mesh1, mesh2, _ = grid(config)
    figure = Figure(figsize=(12.5, 5.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    ood = data["x_ood"][:200]
    extent = (*config.grid_x1, *config.grid_x2)
    for ax, method in zip(axes, METHODS):
        result = results[method]
        s_grid = result["s_grid"].reshape(mesh1.shape)
        s_train = result["s_train"]
        # Colour range: from the best grid score down to well below the lowest training score, so the
        # training support is resolved and everything far outside it saturates dark.
        vmax = float(s_grid.max())
        vmin = float(s_train.min() - 1.5 * (np.median(s_train) - s_train.min()))
        image = ax.imshow(np.clip(s_grid, vmin, vmax), origin="lower", extent=extent, aspect="auto",
                          cmap="viridis", vmin=vmin, vmax=vmax)
        levels = np.quantile(s_train, [0.01, 0.1, 0.5])
        if np.all(np.diff(levels) > 0):
            contours = ax.contour(mesh1, mesh2, s_grid, levels=levels, colors="white", linewidths=0.8,
                                  linestyles="solid")
            ax.clabel(contours, fmt={lv: f"{int(round(100 * (1 - q)))}%" for lv, q in zip(levels, [0.01, 0.1, 0.5])},
                      fontsize=7)
        for label, colour in ((0, "tab:red"), (1, "tab:orange")):
            points = data["x_train"][data["y_train"] == label]
            ax.scatter(points[:, 0], points[:, 1], s=5, c=colour, edgecolors="black", linewidths=0.2,
                       label=f"train, class {label}")
        ax.scatter(ood[:, 0], ood[:, 1], s=6, marker="x", c="white", linewidths=0.6, label="OOD (x2 shifted)")
        ax.set_xlim(config.grid_x1)
        ax.set_ylim(config.grid_x2)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_title(f"{TITLES[method]}\nGaussian-score AUROC = {result['auroc']:.3f}, "
                     f"test acc = {100 * result['test_accuracy']:.1f}%", fontsize=10)
        figure.colorbar(image, ax=ax, label="s(f(x)) = max_c log N(z; μ_c, Σ_c)  (clipped below)")
        ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    figure.suptitle("Winkens et al. 2020, Fig. 2 toy: classes differ in x1 only; OOD differs in x2 only",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------------------------------
# CLI.


def run(out: pathlib.Path, *, steps: int | None = None, seed: int = 0, tiny: bool = False,
        weight_decay: float | None = None) -> dict:
    """Trains and scores both models, writes OUT/toy_2d.png and OUT/toy_2d.json, returns the JSON dict."""
    start = time.perf_counter()
    config = ToyConfig(**TINY) if tiny else ToyConfig()
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        config = dataclasses.replace(config, steps=steps)
    if weight_decay is not None:
        if weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {weight_decay}")
        config = dataclasses.replace(config, weight_decay=weight_decay)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(config, seed)
    _, _, grid_points = grid(config)
    results, timings, final_losses = {}, {}, {}
    for method in METHODS:
        t0 = time.perf_counter()
        params, metrics = train(config, method, data["x_train"], data["y_train"], seed)
        timings[f"train_{method}"] = time.perf_counter() - t0
        tail = slice(-max(1, config.steps // 10), None)  # mean over the last 10% of steps
        final_losses[method] = {k: float(np.mean(metrics[k][tail]))
                                for k in ("loss", "class_loss", "contrastive_loss", "contrastive_accuracy")}
        t0 = time.perf_counter()
        results[method] = evaluate(config, params, data, grid_points)
        timings[f"evaluate_{method}"] = time.perf_counter() - t0
    reference = input_space_reference(data)
    png = out / "toy_2d.png"
    t0 = time.perf_counter()
    plot(config, data, results, png)
    timings["plot"] = time.perf_counter() - t0
    summary = dict(
        auroc={m: results[m]["auroc"] for m in METHODS},
        test_accuracy={m: results[m]["test_accuracy"] for m in METHODS},
        train_accuracy={m: results[m]["train_accuracy"] for m in METHODS},
        final_losses=final_losses,
        input_space_gaussian_auroc=reference,
        steps=config.steps, seed=seed, tiny=tiny,
        hyperparameters=dataclasses.asdict(config),
        png=str(png),
        timings_s=timings,
        wall_time_s=time.perf_counter() - start,
        jax_backend=jax.default_backend(),
    )
    (out / "toy_2d.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model (default 2000; 300 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few-second version (smaller data, steps, grid)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW decoupled weight decay for both models (default 1e-4; see the docstring's "
                             "post-hoc sensitivity note before changing it)")
    args = parser.parse_args(argv)
    summary = run(pathlib.Path(args.out), steps=args.steps, seed=args.seed, tiny=args.tiny,
                  weight_decay=args.weight_decay)
    for method in METHODS:
        print(f"{method:12s} Gaussian-score AUROC {summary['auroc'][method]:.4f}   "
              f"test accuracy {100 * summary['test_accuracy'][method]:.1f}%")
    print(f"input-space Gaussian AUROC (reference, no network) {summary['input_space_gaussian_auroc']:.4f}")
    print(f"steps {summary['steps']}, seed {summary['seed']}, wall time {summary['wall_time_s']:.1f} s; "
          f"wrote {summary['png']} and {pathlib.Path(args.out) / 'toy_2d.json'}")
    return summary


if __name__ == "__main__":
    main()

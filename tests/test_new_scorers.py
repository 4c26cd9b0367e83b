"""The OpenOOD-v1.5 post-hoc scorers (rmds, vim, react, gen, max_logit, kl_matching) against independent
references: plain numpy/scipy re-implementations of each paper's definition written here (explicit
per-class / per-example loops, np.linalg.inv, lstsq, scipy.special), and, where installed, pytorch-ood's
detectors (skipped without torch / pytorch-ood)."""
import contextlib
import importlib
import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.special
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score

from contrastood.ood import scorers
from contrastood.ood.scorers import gen, kl_matching, max_logit, react, rmds, vim
from contrastood.ood.scorers.base import FitContext

NEW_SCORERS = ("rmds", "vim", "react", "gen", "max_logit", "kl_matching")
NUM_CLASSES, DIM = 5, 24


def _config(**overrides):
    ood = dict(shrinkage="none", ridge=1e-6, react_percentile=90.0, vim_dim=0, gen_gamma=0.1, gen_top_m=0)
    ood.update(overrides)
    return types.SimpleNamespace(ood=types.SimpleNamespace(**ood))


def _problem(seed=0, num_train=300, num_test=120, dim=DIM, num_classes=NUM_CLASSES):
    """Post-ReLU-like class clusters, a head that separates them, and the head's logits (float32 features)."""
    rng = np.random.default_rng(seed)
    means = np.abs(rng.normal(size=(num_classes, dim))) * 2.0 + 0.5
    mixing = rng.normal(size=(dim, dim)) * rng.uniform(0.1, 1.0, dim) / np.sqrt(dim)

    def sample(n):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        return np.maximum(means[labels] + rng.normal(size=(n, dim)) @ mixing * 2.0, 0.0).astype(np.float32), labels

    kernel = ((means - means.mean(0)).T / dim * 4.0 + 0.05 * rng.normal(size=(dim, num_classes)))
    bias = rng.normal(size=num_classes) * 0.3 + 1.0
    train_z, train_y = sample(num_train)
    test_z, test_y = sample(num_test)
    return dict(kernel=kernel, bias=bias, train_z=train_z, train_y=train_y, test_z=test_z, test_y=test_y,
                train_logits=train_z.astype(np.float64) @ kernel + bias,
                test_logits=test_z.astype(np.float64) @ kernel + bias,
                means=means)


@pytest.fixture(scope="module")
def problem():
    return _problem()


def _ctx(p, **config):
    return FitContext(config=_config(**config), num_classes=NUM_CLASSES, head_kernel=p["kernel"], head_bias=p["bias"])


def _run(name, p, features=None, **config):
    ctx = _ctx(p, **config)
    scorer = scorers.REGISTRY[name]
    fitted = scorer.fit(dict(pre_logits=p["train_z"], logits=p["train_logits"], labels=p["train_y"]), ctx)
    features = features or dict(pre_logits=p["test_z"], logits=p["test_logits"], labels=p["test_y"])
    return scorer.score(fitted, features, ctx)


# ----------------------------------------------------------------------------------------------------
# Independent references, from the papers' definitions.


def _ref_rmds(train_z, train_y, z, shrinkage):
    train_z, z = train_z.astype(np.float64), z.astype(np.float64)
    classes = range(train_y.max() + 1)
    class_means = [train_z[train_y == c].mean(axis=0) for c in classes]
    pooled = np.concatenate([train_z[train_y == c] - class_means[c] for c in classes])
    if shrinkage == "ledoit_wolf":
        cov, cov0 = ledoit_wolf(pooled, assume_centered=True)[0], ledoit_wolf(train_z)[0]
    else:
        cov, cov0 = pooled.T @ pooled / len(pooled), np.cov(train_z, rowvar=False, bias=True)
    precision, precision0 = np.linalg.inv(cov), np.linalg.inv(cov0)
    mu0 = train_z.mean(axis=0)
    md0 = np.array([(x - mu0) @ precision0 @ (x - mu0) for x in z])
    relative = np.array([[(x - class_means[c]) @ precision @ (x - class_means[c]) - md0[i] for c in classes]
                         for i, x in enumerate(z)])
    return -relative.min(axis=1), relative.argmin(axis=1)


def _ref_vim(train_z, train_logits, kernel, bias, z, logits, principal_dim):
    train_z, z = train_z.astype(np.float64), z.astype(np.float64)
    origin = np.linalg.lstsq(kernel.T, -bias, rcond=None)[0]  # min-norm solution of W^T u = -b
    centred = train_z - origin
    eigvals, eigvecs = scipy.linalg.eigh(centred.T @ centred / len(centred))
    residual_space = eigvecs[:, np.argsort(eigvals)[::-1][principal_dim:]]
    alpha = train_logits.max(axis=1).mean() / np.linalg.norm(centred @ residual_space, axis=1).mean()
    virtual = alpha * np.array([np.linalg.norm(residual_space.T @ (x - origin)) for x in z])
    ood_probability = scipy.special.softmax(np.concatenate([logits, virtual[:, None]], axis=1), axis=1)[:, -1]
    return scipy.special.logsumexp(logits, axis=1) - virtual, ood_probability, alpha


def _ref_react(train_z, kernel, bias, z, percentile):
    threshold = np.percentile(train_z.astype(np.float64).ravel(), percentile)
    logits = [np.clip(x.astype(np.float64), None, threshold) @ kernel + bias for x in z]
    return np.array([scipy.special.logsumexp(l) for l in logits]), np.array([np.argmax(l) for l in logits])


def _ref_gen(logits, gamma, top_m):
    out = []
    for row in logits:
        probs = np.sort(scipy.special.softmax(row))[::-1][:top_m or len(row)]
        out.append(-np.sum(probs ** gamma * (1.0 - probs) ** gamma))
    return np.array(out)


def _ref_kl(train_logits, logits):
    train_probs = scipy.special.softmax(train_logits, axis=1)
    predicted = train_probs.argmax(axis=1)
    templates = [train_probs[predicted == c].mean(axis=0)
                 for c in range(train_logits.shape[1]) if (predicted == c).any()]
    probs = scipy.special.softmax(logits, axis=1)
    return -np.array([min(scipy.special.rel_entr(p, t).sum() for t in templates) for p in probs])


# ----------------------------------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize("shrinkage", ["none", "ledoit_wolf"])
def test_rmds_matches_reference(problem, shrinkage):
    p = problem
    scores, classes = _run("rmds", p, shrinkage=shrinkage)
    expected, expected_classes = _ref_rmds(p["train_z"], p["train_y"], p["test_z"], shrinkage)
    assert scores.dtype == np.float64 and scores.shape == (len(p["test_z"]),)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())
    np.testing.assert_array_equal(classes, expected_classes)


def test_rmds_reuses_the_mahalanobis_fit(problem):
    p = problem
    ctx = _ctx(p)
    train = dict(pre_logits=p["train_z"], logits=p["train_logits"], labels=p["train_y"])
    tied, background = scorers.REGISTRY["rmds"].fit(train, ctx)
    assert scorers.REGISTRY["mahalanobis"].fit(train, ctx) is tied
    assert background.num_classes == 1 and background.tied
    np.testing.assert_allclose(background.means[0], p["train_z"].astype(np.float64).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("vim_dim", [0, 4, 20])  # rule (D = 12 of 24), a thin principal space, a thin residual
def test_vim_matches_reference(problem, vim_dim):
    p = problem
    scores, classes = _run("vim", p, vim_dim=vim_dim)
    principal_dim = vim_dim or DIM // 2
    expected, ood_probability, _ = _ref_vim(p["train_z"], p["train_logits"], p["kernel"], p["bias"], p["test_z"],
                                            p["test_logits"], principal_dim)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())
    np.testing.assert_array_equal(classes, p["test_logits"].argmax(axis=1))
    # The paper's score is the virtual logit's softmax probability (high = OOD): the same ranking, reversed.
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(-ood_probability))


def test_vim_chunking_and_fit_details(problem):
    p = problem
    params = vim.fit_vim(p["train_z"], p["train_logits"], p["kernel"], p["bias"], vim_dim=6, chunk_size=13)
    np.testing.assert_allclose(p["kernel"].T @ params.origin, -p["bias"], atol=1e-10)  # all logits 0 at u
    _, _, alpha = _ref_vim(p["train_z"], p["train_logits"], p["kernel"], p["bias"], p["test_z"], p["test_logits"], 6)
    np.testing.assert_allclose(params.alpha, alpha, rtol=1e-9)
    np.testing.assert_allclose(vim.vim_residual_norms(params, p["test_z"], chunk_size=7),
                               vim.vim_residual_norms(params, p["test_z"]), rtol=1e-12)


@pytest.mark.parametrize("feature_dim,expected", [(6144, 1000), (2048, 1000), (1500, 1000), (1024, 512), (768, 512),
                                                  (640, 320), (512, 256), (24, 12), (3, 1)])
def test_vim_principal_dim_rule(feature_dim, expected):
    assert vim.vim_principal_dim(feature_dim) == expected
    assert vim.vim_principal_dim(feature_dim, 1) == 1


@pytest.mark.parametrize("percentile", [90.0, 50.0, 99.0, 100.0])
def test_react_matches_reference(problem, percentile):
    p = problem
    scores, classes = _run("react", p, react_percentile=percentile)
    expected, expected_classes = _ref_react(p["train_z"], p["kernel"], p["bias"], p["test_z"], percentile)
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    np.testing.assert_array_equal(classes, expected_classes)
    threshold, _, _ = scorers.REGISTRY["react"].fit(dict(pre_logits=p["train_z"]), _ctx(p, react_percentile=percentile))
    np.testing.assert_allclose(react.react_score(threshold, p["test_z"], p["kernel"], p["bias"], chunk_size=7)[0],
                               expected, rtol=1e-10)


@pytest.mark.parametrize("percentile", [0.0, 0.05, 10.0, 35.0, 50.0, 90.0, 99.9, 100.0])
@pytest.mark.parametrize("kind", ["relu", "ties", "normal"])
def test_activation_percentile_matches_numpy_in_bounded_memory(percentile, kind):
    rng = np.random.default_rng(3)
    values = {"relu": np.maximum(rng.normal(size=(400, 30)), 0.0),  # ~50% exact zeros, like post-ReLU features
              "ties": rng.integers(0, 6, size=(400, 30)).astype(np.float64),
              "normal": rng.normal(size=(400, 30))}[kind].astype(np.float32)
    expected = np.percentile(values.astype(np.float64), percentile)
    # Small max_copy: the sampled-bracket path (one chunked pass, partition of the bracket only).
    got = react.activation_percentile(values, percentile, chunk_rows=37, max_copy=4000)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(react.activation_percentile(values, percentile), expected, rtol=1e-12, atol=1e-12)


def test_activation_percentile_bracket_path_is_taken():
    values = np.maximum(np.random.default_rng(4).normal(size=(400, 30)), 0.0)
    num = values.size
    ranks = (int(0.9 * (num - 1)), int(0.9 * (num - 1)) + 1)
    found = react._order_statistics_bracketed(values, ranks, 37, 4000, 0)
    assert found is not None
    np.testing.assert_array_equal(found, np.sort(values.ravel())[list(ranks)])


@pytest.mark.parametrize("gamma,top_m", [(0.1, 0), (0.1, 2), (0.5, 5), (2.0, 1)])
def test_gen_matches_reference(problem, gamma, top_m):
    p = problem
    scores, classes = _run("gen", p, gen_gamma=gamma, gen_top_m=top_m)
    np.testing.assert_allclose(scores, _ref_gen(p["test_logits"], gamma, top_m), rtol=1e-10)
    np.testing.assert_array_equal(classes, p["test_logits"].argmax(axis=1))
    np.testing.assert_allclose(gen.gen_score(p["test_logits"], gamma, top_m, chunk_size=7), scores, rtol=1e-14)


def test_gen_is_finite_for_saturated_softmax():
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-800.0, 800.0, 0.0]])
    with np.errstate(divide="raise", invalid="raise", over="raise"):  # underflow to 0 is expected
        scores = gen.gen_score(logits)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores[1], -3 * (1 / 3) ** 0.1 * (2 / 3) ** 0.1, rtol=1e-12)
    assert scores[0] > scores[1] and scores[2] > scores[1]


def test_max_logit_matches_reference(problem):
    p = problem
    scores, classes = _run("max_logit", p)
    np.testing.assert_array_equal(scores, np.array([max(row) for row in p["test_logits"]]))
    np.testing.assert_array_equal(classes, p["test_logits"].argmax(axis=1))


def test_kl_matching_matches_reference(problem):
    p = problem
    scores, classes = _run("kl_matching", p)
    np.testing.assert_allclose(scores, _ref_kl(p["train_logits"], p["test_logits"]), rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(classes, p["test_logits"].argmax(axis=1))
    templates = kl_matching.fit_kl_templates(p["train_logits"], chunk_size=11)
    np.testing.assert_allclose(kl_matching.kl_matching_score(templates, p["test_logits"], chunk_size=7), scores,
                               rtol=1e-10, atol=1e-14)


def test_kl_matching_skips_classes_never_predicted():
    rng = np.random.default_rng(5)
    train_logits = rng.normal(size=(200, 4))
    train_logits[:, 2] -= 50.0  # class 2 is never the argmax: no template
    test_logits = rng.normal(size=(30, 4)) * 3.0
    templates = kl_matching.fit_kl_templates(train_logits)
    np.testing.assert_array_equal(templates.classes, [0, 1, 3])
    np.testing.assert_allclose(np.exp(templates.log_templates),
                               [scipy.special.softmax(train_logits[train_logits.argmax(1) == c], axis=1).mean(0)
                                for c in (0, 1, 3)], rtol=1e-10)
    np.testing.assert_allclose(kl_matching.kl_matching_score(templates, test_logits),
                               _ref_kl(train_logits, test_logits), rtol=1e-8, atol=1e-12)
    # Template coordinates whose probabilities all underflow stay finite in the log domain.
    extreme = np.array([[0.0, -2000.0], [0.0, -2500.0], [-1900.0, 0.0]])
    assert np.isfinite(kl_matching.kl_matching_score(kl_matching.fit_kl_templates(extreme), extreme)).all()


# ----------------------------------------------------------------------------------------------------
# Registration, sign convention, degenerate input.


def test_new_scorers_resolve_under_all_in_rank_order():
    resolved = scorers.resolve(("all",))
    assert set(NEW_SCORERS) <= set(resolved)
    assert [n for n in resolved if n in NEW_SCORERS] == sorted(NEW_SCORERS, key=lambda n: scorers.REGISTRY[n].rank)
    assert all(30 <= scorers.REGISTRY[n].rank <= 35 for n in NEW_SCORERS)
    assert len({scorers.REGISTRY[n].rank for n in NEW_SCORERS}) == 6
    assert all(scorers.REGISTRY[n].description for n in NEW_SCORERS)
    assert scorers.resolve("vim,react") == ("vim", "react")


@pytest.mark.parametrize("name", NEW_SCORERS)
def test_in_distribution_scores_higher_than_shifted(problem, name):
    """ID test points vs points between the classes (flat logits), pushed off the training span."""
    p = problem
    rng = np.random.default_rng(7)
    null_space = scipy.linalg.null_space(p["kernel"].T)  # directions that do not change the logits
    shifted = (p["means"].mean(0) + rng.normal(size=(100, DIM)) * 0.3
               + rng.normal(size=(100, null_space.shape[1])) @ null_space.T * 3.0).astype(np.float32)
    both = np.concatenate([p["test_z"], shifted])
    features = dict(pre_logits=both, logits=both.astype(np.float64) @ p["kernel"] + p["bias"],
                    labels=np.zeros(len(both), np.int64))
    scores, classes = _run(name, p, features=features)
    assert scores.shape == (len(both),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert classes is None or (classes.shape == (len(both),) and np.issubdtype(classes.dtype, np.integer))
    is_id = np.arange(len(both)) < len(p["test_z"])
    assert roc_auc_score(is_id, scores) > 0.9
    assert scores[is_id].mean() > scores[~is_id].mean()


def test_degenerate_input_raises_naming_the_fix(problem):
    p = problem
    train = dict(pre_logits=p["train_z"], logits=p["train_logits"], labels=p["train_y"])
    with pytest.raises(ValueError, match="ood.vim_dim"):
        scorers.REGISTRY["vim"].fit(train, _ctx(p, vim_dim=DIM))
    with pytest.raises(ValueError, match="ood.vim_dim"):
        vim.vim_principal_dim(1)
    no_head = FitContext(config=_config(), num_classes=NUM_CLASSES)
    for name in ("vim", "react"):
        with pytest.raises(ValueError, match="head_kernel"):
            scorers.REGISTRY[name].fit(train, no_head)
    with pytest.raises(ValueError, match="head_kernel"):
        scorers.REGISTRY["vim"].fit(train, FitContext(_config(), NUM_CLASSES, p["kernel"][:-1], p["bias"]))
    # Training features inside a 3-d affine subspace through u: nothing is left outside a D = 5 space.
    origin = -np.linalg.pinv(p["kernel"].T) @ p["bias"]
    flat = origin + np.random.default_rng(0).normal(size=(100, 3)) @ np.random.default_rng(1).normal(size=(3, DIM))
    with pytest.raises(ValueError, match="lower ood.vim_dim"):
        vim.fit_vim(flat, flat @ p["kernel"] + p["bias"] + 5.0, p["kernel"], p["bias"], vim_dim=5)
    with pytest.raises(ValueError, match="max-logit"):
        vim.fit_vim(p["train_z"], p["train_logits"] - 100.0, p["kernel"], p["bias"] - 100.0, vim_dim=5)
    with pytest.raises(ValueError, match="ood.gen_top_m"):
        _run("gen", p, gen_top_m=NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="ood.gen_gamma"):
        gen.gen_score(p["test_logits"], gamma=0.0)
    with pytest.raises(ValueError, match="ood.react_percentile"):
        react.activation_percentile(p["train_z"], 101.0)
    with pytest.raises(ValueError, match="empty"):
        kl_matching.fit_kl_templates(np.zeros((0, NUM_CLASSES)))
    bad = p["test_logits"].copy()
    bad[3, 1] = np.nan
    for fn in (max_logit.max_logit_score, gen.gen_score):
        with pytest.raises(ValueError, match="non-finite"):
            fn(bad)
    with pytest.raises(ValueError, match="dim"):
        rmds.relative_mahalanobis_score(*scorers.REGISTRY["rmds"].fit(train, _ctx(p)), p["test_z"][:, :-1])


# ----------------------------------------------------------------------------------------------------
# pytorch-ood (optional). Its 0.4.0 package __init__ imports its model zoo, which needs torchvision; the
# detector modules themselves need only torch, so without torchvision they are loaded under a stub of the
# package (sys.modules is restored afterwards).


@pytest.fixture(scope="module")
def pood():
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None:
        pytest.skip("pytorch-ood is not installed")
    names = ("vim", "react", "klmatching", "maxlogit", "rmd", "gen")
    try:
        modules = {n: importlib.import_module(f"pytorch_ood.detector.{n}") for n in names}
    except ImportError:
        saved = {k: v for k, v in sys.modules.items() if k == "pytorch_ood" or k.startswith("pytorch_ood.")}
        for key in saved:
            del sys.modules[key]
        root = pathlib.Path(spec.submodule_search_locations[0])
        try:
            for name, path in (("pytorch_ood", root), ("pytorch_ood.detector", root / "detector")):
                stub = types.ModuleType(name)
                stub.__path__ = [str(path)]
                sys.modules[name] = stub
            modules = {n: importlib.import_module(f"pytorch_ood.detector.{n}") for n in names}
        except ImportError as error:
            pytest.skip(f"pytorch-ood detectors do not import: {error}")
        finally:
            for key in [k for k in sys.modules if k == "pytorch_ood" or k.startswith("pytorch_ood.")]:
                del sys.modules[key]
            sys.modules.update(saved)
    return types.SimpleNamespace(torch=torch, **{n: m for n, m in modules.items()})


@contextlib.contextmanager
def _torch_float64(torch):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_pytorch_ood_max_logit_gen_kl(pood, problem):
    torch, p = pood.torch, problem
    test_logits = torch.from_numpy(p["test_logits"])
    theirs = pood.maxlogit.MaxLogit(None).predict_logits(test_logits).numpy()
    np.testing.assert_array_equal(_run("max_logit", p)[0], -theirs)
    # pytorch-ood's GEN averages (not sums) the top-M terms and clamps p to [1e-7, 1 - 1e-7] (inactive here).
    for gamma, top_m in ((0.1, 0), (0.5, 2)):
        theirs = pood.gen.GEN(None, gamma=gamma, M=top_m or None).predict_logits(test_logits).numpy()
        ours = _run("gen", p, gen_gamma=gamma, gen_top_m=top_m)[0]
        np.testing.assert_allclose(ours, -(top_m or NUM_CLASSES) * theirs, rtol=1e-10)
    detector = pood.klmatching.KLMatching(None).fit_logits(torch.from_numpy(p["train_logits"]))
    np.testing.assert_allclose(_run("kl_matching", p)[0], -detector.predict_logits(test_logits).numpy(),
                               rtol=1e-8, atol=1e-12)


def test_pytorch_ood_react(pood, problem):
    torch, p = pood.torch, problem
    kernel, bias = torch.from_numpy(p["kernel"]), torch.from_numpy(p["bias"])
    detector = pood.react.ReAct(backbone=None, head=lambda h: h.double() @ kernel + bias, percentile=0.9)
    detector.fit_feature_maps(torch.from_numpy(p["train_z"].astype(np.float64)), torch.from_numpy(p["train_y"]))
    theirs = detector.predict_feature_maps(torch.from_numpy(p["test_z"].astype(np.float64))).numpy()
    np.testing.assert_allclose(_run("react", p)[0], -theirs, rtol=1e-10)


def test_pytorch_ood_rmd(pood, problem):
    """pytorch-ood's covariances are scatter matrices (not divided by N) plus 1e-6 I: its RMD is ours / N."""
    torch, p = pood.torch, problem
    with _torch_float64(torch):
        detector = pood.rmd.RMD(None)
        detector.fit_features(torch.from_numpy(p["train_z"].astype(np.float64)), torch.from_numpy(p["train_y"]))
        theirs = detector.predict_features(torch.from_numpy(p["test_z"].astype(np.float64))).numpy()
    ours = _run("rmds", p, shrinkage="none")[0]
    np.testing.assert_allclose(ours, -len(p["train_z"]) * theirs, rtol=1e-5, atol=1e-5 * np.abs(ours).max())


def test_pytorch_ood_vim(pood, problem):
    """pytorch-ood's ViM computes in float32, hence the loose tolerance."""
    torch, p = pood.torch, problem
    for vim_dim in (4, 12):
        detector = pood.vim.ViM(None, d=vim_dim, w=torch.from_numpy(p["kernel"].T.copy()),
                                b=torch.from_numpy(p["bias"]))
        detector.fit_features(torch.from_numpy(p["train_z"]), torch.from_numpy(p["train_y"]))
        theirs = detector.predict_features(torch.from_numpy(p["test_z"])).numpy().astype(np.float64)
        ours = _run("vim", p, vim_dim=vim_dim)[0]
        np.testing.assert_allclose(ours, -theirs, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_the_gaussian_family_computes_each_sets_distances_once(problem, monkeypatch):
    """gaussian + gaussian_no_logdet share the per-class distances of a set, mahalanobis + rmds the tied ones
    (plus rmds' background): 3 distance computations per set instead of 5, and the same scores."""
    from contrastood.ood import evaluate
    from contrastood.ood.scorers import gaussian

    names = ("gaussian", "gaussian_no_logdet", "mahalanobis", "rmds")
    train = dict(pre_logits=problem["train_z"], logits=problem["train_logits"], labels=problem["train_y"])
    ctx = _ctx(problem)
    fitted, failures = evaluate.fit_scorers(names, train, ctx)
    assert failures == {}
    calls = []
    real = gaussian.squared_mahalanobis

    def counted(params, features, **kwargs):
        calls.append(params.num_classes)
        return real(params, features, **kwargs)

    monkeypatch.setattr(gaussian, "squared_mahalanobis", counted)
    monkeypatch.setattr(rmds, "squared_mahalanobis", counted)
    sets = {"a": problem["test_z"], "b": problem["test_z"][::-1].copy()}
    for z in sets.values():
        calls.clear()
        scored = evaluate.compute_scores(fitted, dict(pre_logits=z, logits=z @ problem["kernel"]), ctx, failures, "t")
        assert len(calls) == 3 and sorted(calls) == [1, NUM_CLASSES, NUM_CLASSES]
        monkeypatch.setattr(gaussian, "squared_mahalanobis", real)
        monkeypatch.setattr(rmds, "squared_mahalanobis", real)
        direct = {
            "gaussian": gaussian.gaussian_score(fitted["gaussian"], z, use_logdet=True),
            "gaussian_no_logdet": gaussian.gaussian_score(fitted["gaussian_no_logdet"], z, use_logdet=False),
            "mahalanobis": gaussian.mahalanobis_score(fitted["mahalanobis"], z),
            "rmds": rmds.relative_mahalanobis_score(*fitted["rmds"], z),
        }
        monkeypatch.setattr(gaussian, "squared_mahalanobis", counted)
        monkeypatch.setattr(rmds, "squared_mahalanobis", counted)
        for name, (scores, classes) in direct.items():
            np.testing.assert_array_equal(scored[name]["scores"], scores, err_msg=name)
            np.testing.assert_array_equal(scored[name]["classes"], classes, err_msg=name)
    assert ctx.per_set == {}  # nothing of one set leaks into the next

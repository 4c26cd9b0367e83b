"""Scorers against scipy / scikit-learn / numpy references on small random data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from sklearn.covariance import EmpiricalCovariance, ledoit_wolf
from sklearn.neighbors import NearestNeighbors

from contrastood.ood import scorers


def _class_data(counts, dim, seed=0):
    """Anisotropic, correlated Gaussian classes with distinct means (float32, like extracted features)."""
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for c, count in enumerate(counts):
        mixing = rng.normal(size=(dim, dim)) * rng.uniform(0.2, 2.0, dim)
        features.append(rng.normal(size=(count, dim)) @ mixing + 3.0 * rng.normal(size=dim))
        labels.append(np.full(count, c))
    return np.concatenate(features).astype(np.float32), np.concatenate(labels)


def _reference_covariance(class_features, shrinkage, ridge):
    x = class_features.astype(np.float64)
    if shrinkage == "ledoit_wolf":
        return ledoit_wolf(x)[0]
    cov = EmpiricalCovariance().fit(x).covariance_
    if shrinkage == "ridge":
        cov = cov + ridge * np.trace(cov) / x.shape[1] * np.eye(x.shape[1])
    return cov


def _scipy_log_densities(features, labels, queries, shrinkage, ridge=1e-2):
    columns = []
    for c in range(labels.max() + 1):
        class_features = features[labels == c].astype(np.float64)
        cov = _reference_covariance(class_features, shrinkage, ridge)
        columns.append(scipy.stats.multivariate_normal(class_features.mean(0), cov).logpdf(queries))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("counts,dim,shrinkage", [
    ((40, 55, 48), 6, "none"),            # n_c > d: full eigenbasis, no shrinkage.
    ((40, 55, 48), 6, "ledoit_wolf"),
    ((40, 55, 48), 6, "ridge"),
    ((7, 12, 9), 16, "ledoit_wolf"),      # n_c < d: thin factors, imbalanced (padding) classes.
    ((7, 12, 9), 16, "ridge"),
    ((30, 5, 12), 16, "ledoit_wolf"),     # largest class n_c > d: full basis, others rank-deficient.
])
def test_gaussian_score_matches_scipy_logpdf(counts, dim, shrinkage):
    features, labels = _class_data(counts, dim)
    queries = np.random.default_rng(1).normal(size=(23, dim)) * 3.0
    queries[:5] = features[np.linspace(0, len(features) - 1, 5).astype(int)]  # in-distribution points too
    params = scorers.fit_gaussians(features, labels, len(counts), shrinkage=shrinkage, ridge=1e-2)
    assert params.components.shape[1] == (dim if max(counts) >= dim else max(counts))
    expected = _scipy_log_densities(features, labels, queries, shrinkage)

    # Small chunks (not dividing M) and class batches exercise the padding paths.
    log_densities = scorers.gaussian_log_densities(params, queries, chunk_size=7, class_batch_size=2)
    np.testing.assert_allclose(log_densities, expected, rtol=1e-10, atol=1e-9)
    scores, classes = scorers.gaussian_score(params, queries, chunk_size=7, class_batch_size=2)
    np.testing.assert_allclose(scores, expected.max(axis=1), rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(classes, expected.argmax(axis=1))
    for c in range(len(counts)):
        reference = _reference_covariance(features[labels == c], shrinkage, 1e-2)
        np.testing.assert_allclose(params.covariance(c), reference, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(params.log_dets[c], np.linalg.slogdet(reference)[1], rtol=1e-10)


def test_ledoit_wolf_coefficient_matches_sklearn_in_thin_case():
    features, labels = _class_data((6, 9), 20, seed=3)
    params = scorers.fit_gaussians(features, labels, 2)
    for c in range(2):
        _, coef = ledoit_wolf(features[labels == c].astype(np.float64))
        assert 0 < coef < 1
        np.testing.assert_allclose(params.shrinkage_coefs[c], coef, rtol=1e-10)
    # Thin factors: one orthonormal column per kept direction, zero padding columns.
    rows = params.components[1]
    np.testing.assert_allclose(rows @ rows.T, np.diag((np.abs(rows).sum(1) > 0).astype(float)), atol=1e-10)


def test_use_logdet_false_is_minus_half_mahalanobis():
    features, labels = _class_data((30, 25), 5, seed=4)
    queries = np.random.default_rng(5).normal(size=(11, 5))
    params = scorers.fit_gaussians(features, labels, 2, shrinkage="none")
    half_distances = []
    for c in range(2):
        x = features[labels == c].astype(np.float64)
        centred = queries - x.mean(0)
        cov = np.cov(x.T, bias=True)
        half_distances.append(0.5 * np.einsum("md,md->m", centred, np.linalg.solve(cov, centred.T).T))
    half_distances = np.stack(half_distances, axis=1)
    scores, classes = scorers.gaussian_score(params, queries, use_logdet=False)
    np.testing.assert_allclose(scores, -half_distances.min(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(classes, half_distances.argmin(axis=1))
    with_logdet, _ = scorers.gaussian_score(params, queries)
    assert not np.allclose(scores, with_logdet)


def _pooled_covariance(features, labels, num_classes):
    means = np.stack([features[labels == c].astype(np.float64).mean(0) for c in range(num_classes)])
    centred = features.astype(np.float64) - means[labels]
    return means, centred


def test_tied_gaussians_and_mahalanobis_match_pooled_covariance():
    features, labels = _class_data((25, 30, 20), 6, seed=6)
    queries = np.random.default_rng(7).normal(size=(19, 6)) * 4.0
    means, centred = _pooled_covariance(features, labels, 3)

    tied = scorers.fit_gaussians(features, labels, 3, tied=True, shrinkage="none")
    pooled = EmpiricalCovariance().fit(centred).covariance_
    np.testing.assert_allclose(tied.covariance(2), pooled, rtol=1e-10, atol=1e-12)
    diffs = queries[:, None, :] - means[None]
    solved = np.linalg.solve(pooled, diffs.reshape(-1, 6).T).T.reshape(diffs.shape)
    distances = np.einsum("mcd,mcd->mc", diffs, solved)
    scores, classes = scorers.mahalanobis_score(tied, queries, chunk_size=8)
    np.testing.assert_allclose(scores, -distances.min(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(classes, distances.argmin(axis=1))

    # gaussian_score with the tied covariance: scipy logpdf with the pooled covariance per class.
    expected = np.stack([scipy.stats.multivariate_normal(m, pooled).logpdf(queries) for m in means], axis=1)
    np.testing.assert_allclose(scorers.gaussian_score(tied, queries)[0], expected.max(1), rtol=1e-10)

    # Tied Ledoit-Wolf uses the pooled class-centred data; per-class fits give different scores.
    tied_lw = scorers.fit_gaussians(features, labels, 3, tied=True)
    np.testing.assert_allclose(tied_lw.covariance(0), ledoit_wolf(centred)[0], rtol=1e-10, atol=1e-12)
    per_class = scorers.fit_gaussians(features, labels, 3)
    assert np.abs(scorers.gaussian_score(per_class, queries)[0]
                  - scorers.gaussian_score(tied_lw, queries)[0]).max() > 1e-3
    with pytest.raises(ValueError, match="tied=True"):
        scorers.mahalanobis_score(per_class, queries)


def test_tied_allows_single_example_classes():
    features, labels = _class_data((1, 20, 15), 4, seed=8)
    params = scorers.fit_gaussians(features, labels, 3, tied=True)
    means, centred = _pooled_covariance(features, labels, 3)
    np.testing.assert_allclose(params.means, means, rtol=1e-12)
    np.testing.assert_allclose(params.covariance(0), ledoit_wolf(centred)[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="single example.*tied=True"):
        scorers.fit_gaussians(features, labels, 3)


def test_float32_scoring_is_close_to_float64():
    features, labels = _class_data((12, 10), 24, seed=9)
    queries = np.random.default_rng(10).normal(size=(9, 24))
    params = scorers.fit_gaussians(features, labels, 2)
    params32 = scorers.fit_gaussians(features, labels, 2, dtype=jnp.float32)
    reference = scorers.gaussian_score(params, queries)[0]
    np.testing.assert_allclose(scorers.gaussian_score(params32, queries, dtype=jnp.float32)[0], reference,
                               rtol=1e-4)


def test_msp_and_energy_match_numpy():
    logits = np.random.default_rng(11).normal(size=(13, 7)) * 5.0
    np.testing.assert_allclose(scorers.msp_score(logits), scipy.special.softmax(logits, axis=1).max(1),
                               rtol=1e-12)
    np.testing.assert_allclose(scorers.energy_score(logits), scipy.special.logsumexp(logits, axis=1),
                               rtol=1e-12)
    logits32 = logits.astype(np.float32)
    np.testing.assert_allclose(scorers.energy_score(logits32, temperature=2.5),
                               2.5 * scipy.special.logsumexp(logits32 / 2.5, axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        scorers.energy_score(logits, temperature=0.0)


def test_knn_matches_sklearn_nearest_neighbors():
    rng = np.random.default_rng(12)
    train = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    queries[0] = 0.0  # an all-zero feature stays zero: distance 1 to every unit vector
    train_unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    query_unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    index = scorers.fit_knn(train)
    for k in (1, 5, 50):
        distances, _ = NearestNeighbors(n_neighbors=k).fit(train_unit).kneighbors(query_unit)
        np.testing.assert_allclose(scorers.knn_score(index, queries, k=k, chunk_size=10), -distances[:, -1],
                                   atol=1e-5)
        np.testing.assert_allclose(scorers.knn_score(index, queries, k=k, dtype=jnp.float64), -distances[:, -1],
                                   atol=1e-6)
    np.testing.assert_allclose(scorers.knn_score(index, queries[:1], k=3), [-1.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 300\]"):
        scorers.knn_score(index, queries, k=301)


def test_odin_matches_manual_gradient():
    rng = np.random.default_rng(13)
    weights = rng.normal(size=(2 * 2 * 3, 4))
    bias = rng.normal(size=4)
    images = rng.uniform(size=(5, 2, 2, 3))
    temperature, epsilon = 7.0, 0.05

    def logits_fn(x):
        return x.reshape(x.shape[0], -1) @ jnp.asarray(weights, x.dtype) + jnp.asarray(bias, x.dtype)

    # d/dx log softmax_y(x W / T) = (W[:, y] - W p) / T for the linear model, p = softmax(x W / T).
    flat = images.reshape(5, -1)
    probs = scipy.special.softmax((flat @ weights + bias) / temperature, axis=1)
    predicted = probs.argmax(1)
    gradient = (weights[:, predicted].T - probs @ weights.T) / temperature
    perturbed = flat - epsilon * np.sign(-gradient)
    expected = scipy.special.softmax((perturbed @ weights + bias) / temperature, axis=1).max(1)
    clean = probs.max(1)

    with jax.enable_x64(True):
        got = scorers.odin_score(logits_fn, jnp.asarray(images), temperature=temperature, epsilon=epsilon)
        jitted = jax.jit(lambda x: scorers.odin_score(logits_fn, x, temperature=temperature, epsilon=epsilon))
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        np.testing.assert_allclose(jitted(jnp.asarray(images)), expected, rtol=1e-12)
    assert (expected > clean).all()  # the perturbation raises the confidence, as ODIN intends
    float32 = scorers.odin_score(logits_fn, jnp.asarray(images, jnp.float32), temperature=temperature,
                                 epsilon=epsilon)
    np.testing.assert_allclose(float32, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="floating point"):
        scorers.odin_score(logits_fn, jnp.zeros((1, 2, 2, 3), jnp.uint8))


def test_fit_errors_name_the_problem():
    features, labels = _class_data((8, 9), 4, seed=14)
    with pytest.raises(ValueError, match=r"classes \[2\] have no training examples"):
        scorers.fit_gaussians(features, labels, 3)
    bad = features.copy()
    bad[3, 1], bad[5, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 non-finite.*first rows \[3, 5\]"):
        scorers.fit_gaussians(bad, labels, 2)
    with pytest.raises(ValueError, match="2-D"):
        scorers.fit_gaussians(features[0], labels[:1], 2)
    with pytest.raises(ValueError, match="labels must have shape"):
        scorers.fit_gaussians(features, labels[:-1], 2)
    with pytest.raises(ValueError, match="drop unlabelled"):
        scorers.fit_gaussians(features, np.where(labels == 0, -1, labels), 2)
    with pytest.raises(ValueError, match="shrinkage must be one of"):
        scorers.fit_gaussians(features, labels, 2, shrinkage="oas")
    with pytest.raises(ValueError, match="float32 or float64"):
        scorers.fit_gaussians(features, labels, 2, dtype=jnp.bfloat16)


def test_singular_covariance_without_shrinkage_is_refused():
    thin_features, thin_labels = _class_data((5, 6), 10, seed=15)  # n_c < d
    with pytest.raises(ValueError, match="singular.*shrinkage='ledoit_wolf'"):
        scorers.fit_gaussians(thin_features, thin_labels, 2, shrinkage="none")
    features, labels = _class_data((30, 30), 4, seed=16)
    features[:, 3] = features[:, 0]  # a duplicated feature: rank 3 with n_c > d
    with pytest.raises(ValueError, match="singular"):
        scorers.fit_gaussians(features, labels, 2, shrinkage="none")
    with pytest.raises(ValueError, match="singular"):
        scorers.fit_gaussians(features, labels, 2, tied=True, shrinkage="none")
    scorers.fit_gaussians(features, labels, 2, shrinkage="ridge")  # ridge makes it well-posed


def test_scoring_errors_name_the_problem():
    features, labels = _class_data((10, 10), 3, seed=17)
    params = scorers.fit_gaussians(features, labels, 2)
    with pytest.raises(ValueError, match="dim 4 but the fitted model expects 3"):
        scorers.gaussian_score(params, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="empty"):
        scorers.gaussian_score(params, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        scorers.gaussian_score(params, np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="chunk_size"):
        scorers.gaussian_score(params, np.zeros((2, 3)), chunk_size=0)
    with pytest.raises(ValueError, match="2-D"):
        scorers.msp_score(np.zeros(5))

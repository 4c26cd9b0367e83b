"""NT-Xent against a direct loop over Eq. 1; label-smoothed cross-entropy against numpy."""
import numpy as np
import pytest

from contrastood import losses


def nt_xent_loop(z1, z2, tau):
    """Eq. 1 of Winkens et al. / SimCLR, written as literally as possible."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total, correct = 0.0, 0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = {k: float(z[i] @ z[k]) / tau for k in range(n2) if k != i}
        denom = sum(np.exp(s) for s in sims.values())
        total += -np.log(np.exp(sims[j]) / denom)
        correct += max(sims, key=sims.get) == j
    return total / n2, correct / n2


@pytest.mark.parametrize("n,d,tau", [(4, 3, 1.0), (8, 16, 0.5), (5, 128, 0.1)])
def test_nt_xent_matches_eq1_loop(n, d, tau):
    rng = np.random.default_rng(n * d)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    loss, acc = losses.nt_xent(z1, z2, tau)
    ref_loss, ref_acc = nt_xent_loop(z1, z2, tau)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    assert float(acc) == pytest.approx(ref_acc)


def test_nt_xent_mask_equals_dropping_examples():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 6, 8)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    masked, _ = losses.nt_xent(z1, z2, 0.5, mask=mask)
    dropped, _ = losses.nt_xent(z1[mask], z2[mask], 0.5)
    np.testing.assert_allclose(float(masked), float(dropped), rtol=1e-6)


def test_nt_xent_is_scale_invariant_and_rejects_bad_shapes():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 4, 8)).astype(np.float32)
    a, _ = losses.nt_xent(z1, z2, 1.0)
    b, _ = losses.nt_xent(3 * z1, 0.2 * z2, 1.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    with pytest.raises(ValueError, match="equal shape"):
        losses.nt_xent(z1, z2[:3], 1.0)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1])
def test_smoothed_cross_entropy_matches_numpy(eps):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=7)
    loss, acc = losses.smoothed_cross_entropy(logits, labels, eps)
    targets = np.full((7, 5), eps / 5) + (1 - eps) * np.eye(5)[labels]
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(loss), -(targets * logp).sum(1).mean(), rtol=1e-5)
    assert float(acc) == pytest.approx(np.mean(logits.argmax(1) == labels))

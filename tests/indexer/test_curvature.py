"""EK-FAC in the projected space: features whose inner product is g_qᵀ (H + λI)⁻¹ g_d."""

import numpy as np

from indexer.curvature import LayerStats, Stats, fit


def random_stats(rng, shapes, scale=1.0):
    stats = Stats()
    for i, (k_out, k_in) in enumerate(shapes):
        a, s = rng.normal(size=(k_in, 2 * k_in)), rng.normal(size=(k_out, 2 * k_out))
        stats.layers[f"l{i}"] = LayerStats(scale * a @ a.T, scale * s @ s.T, tokens=10 * scale)
    return stats


def test_inner_product_is_damped_inverse_ekfac_hessian():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (2, 5)]
    stats = random_stats(rng, shapes)
    grads = rng.normal(size=(40, sum(o * i for o, i in shapes)))
    damping = 0.1
    curv = fit(stats, [grads[:25], grads[25:]], damping)
    feats = curv.apply(grads)
    col = 0
    for (k_out, k_in), c in zip(shapes, curv.layers.values()):
        d = k_out * k_in
        g = grads[:, col:col + d]
        k = np.kron(c.q_out, c.q_in)  # row-major vec(Q_Sᵀ G Q_A) = kᵀ vec(G)
        lam = ((g @ k) ** 2).mean(0)  # eigenvalue corrections, by definition
        h = k @ np.diag(lam) @ k.T + damping * lam.mean() * np.eye(d)
        want = g @ np.linalg.solve(h, g.T)
        got = feats[:, col:col + d].astype(np.float64) @ feats[:, col:col + d].T.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        col += d


def test_shard_statistics_reduce_by_summation(tmp_path):
    rng = np.random.default_rng(1)
    shapes = [(3, 4)]
    a, b = random_stats(rng, shapes), random_stats(rng, shapes, scale=2.0)
    a.save(tmp_path / "a.npz")
    merged = Stats().add(Stats.load(tmp_path / "a.npz")).add(b)
    np.testing.assert_allclose(merged.layers["l0"].a_sum, a.layers["l0"].a_sum + b.layers["l0"].a_sum)
    np.testing.assert_allclose(merged.layers["l0"].s_sum, a.layers["l0"].s_sum + b.layers["l0"].s_sum)
    assert merged.layers["l0"].tokens == a.layers["l0"].tokens + b.layers["l0"].tokens


def test_kept_moments_refit_exactly_and_apply_inverts(tmp_path):
    """What `wherefrom index --update --refit-curvature` relies on: the fit from kept sums (saved,
    reloaded, reduced across two parts) equals the fit over the raw rows, and `unapply` undoes `apply`."""
    from indexer.curvature import Moments, fit_moments, load_state, save_state

    rng = np.random.default_rng(2)
    shapes = [(3, 4), (2, 5)]
    stats = random_stats(rng, shapes)
    grads = rng.normal(size=(40, sum(o * i for o, i in shapes)))
    first, second = Moments.zeros(shapes), Moments.zeros(shapes)
    first.add_block(grads[:25])
    second.add_block(grads[25:])
    save_state(tmp_path / "kfac.npz", stats, first)
    kept_stats, kept = load_state(tmp_path / "kfac.npz")
    want = fit(stats, [grads], 0.1)
    got = fit_moments(kept_stats, kept.add(second), 0.1)
    for w, g in zip(want.layers.values(), got.layers.values()):
        np.testing.assert_allclose(g.inv_sqrt, w.inv_sqrt, rtol=1e-10)
    np.testing.assert_allclose(want.unapply(want.apply(grads)), grads, rtol=1e-5, atol=1e-6)
    assert Moments.zeros([(64, 64)]) is None  # exact gradients: too wide to keep, refit refused

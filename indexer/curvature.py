"""EK-FAC curvature in the projected space, fitted from one pass's statistics.

Per layer, K-FAC approximates the Fisher by A ⊗ S with A = E[x̃x̃ᵀ] (projected inputs) and
S = E[δ̃δ̃ᵀ] (projected output gradients). EK-FAC keeps the eigenbases Q_A, Q_S but replaces the
Kronecker eigenvalues by the exact second moments of gradients in that basis:
Λ_ij = E_n[(Q_Sᵀ G_n Q_A)_ij²]. A feature is then (Q_Sᵀ G Q_A) / √(Λ + λ), so that the inner
product of two features is g_qᵀ (H + λI)⁻¹ g_d — an influence estimate.

In the projected space every matrix is tiny (8×8 per side with the default projection), so the
statistics of a shard are a few KB and reduce across shards by summation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.store import save_npz


@dataclass
class LayerStats:
    """Running sums for one layer: A and S numerators, token count, and Λ numerator over examples."""

    a_sum: np.ndarray  # (k_in, k_in)
    s_sum: np.ndarray  # (k_out, k_out)
    tokens: float = 0.0


@dataclass
class Stats:
    """K-FAC factor sums per layer (in tracked-layer order); `add` reduces shards."""

    layers: dict[str, LayerStats] = field(default_factory=dict)

    def add(self, other: Stats) -> Stats:
        for name, s in other.layers.items():
            mine = self.layers.get(name)
            if mine is None:
                self.layers[name] = LayerStats(s.a_sum.copy(), s.s_sum.copy(), s.tokens)
            else:
                mine.a_sum += s.a_sum
                mine.s_sum += s.s_sum
                mine.tokens += s.tokens
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for i, (name, s) in enumerate(self.layers.items()):
            arrays[f"{i}.a"], arrays[f"{i}.s"] = s.a_sum, s.s_sum
            arrays[f"{i}.t"] = np.array(s.tokens)
        return {"names": np.array(list(self.layers)), **arrays}

    def save(self, path: Path) -> None:
        save_npz(path, self.arrays())

    @classmethod
    def from_arrays(cls, z) -> Stats:
        return cls({str(n): LayerStats(z[f"{i}.a"], z[f"{i}.s"], float(z[f"{i}.t"]))
                    for i, n in enumerate(z["names"])})

    @classmethod
    def load(cls, path: Path) -> Stats:
        return cls.from_arrays(np.load(path))


@dataclass
class LayerCurvature:
    q_in: np.ndarray  # (k_in, k_in) eigenvectors of A
    q_out: np.ndarray  # (k_out, k_out) eigenvectors of S
    inv_sqrt: np.ndarray  # (k_out, k_in) 1 / √(Λ + λ)


class Curvature:
    """Per-layer EK-FAC transforms, applied to flat (n, D) blocks of projected gradients."""

    def __init__(self, layers: dict[str, LayerCurvature]):
        self.layers = layers

    def shapes(self) -> list[tuple[int, int]]:
        return [c.inv_sqrt.shape for c in self.layers.values()]

    def rotate(self, g: np.ndarray) -> list[np.ndarray]:
        """(n, D) → per layer (n, k_out, k_in) in the eigenbasis: Q_Sᵀ G Q_A."""
        out, col = [], 0
        for c in self.layers.values():
            k_out, k_in = c.inv_sqrt.shape
            block = g[:, col:col + k_out * k_in].reshape(-1, k_out, k_in)
            out.append(np.einsum("ij,njk,kl->nil", c.q_out.T, block, c.q_in, optimize=True))
            col += k_out * k_in
        return out

    def apply(self, g: np.ndarray) -> np.ndarray:
        """Preconditioned features (n, D) float32."""
        g = np.asarray(g, dtype=np.float64)
        parts = [(r * c.inv_sqrt).reshape(len(g), -1) for r, c in zip(self.rotate(g), self.layers.values())]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def unapply(self, f: np.ndarray) -> np.ndarray:
        """The inverse of `apply`: projected gradients (n, D) float64 from preconditioned features."""
        f, out, col = np.asarray(f, dtype=np.float64), [], 0
        for c in self.layers.values():
            k_out, k_in = c.inv_sqrt.shape
            r = f[:, col:col + k_out * k_in].reshape(-1, k_out, k_in) / c.inv_sqrt
            out.append(np.einsum("ij,njk,kl->nil", c.q_out, r, c.q_in.T, optimize=True).reshape(len(f), -1))
            col += k_out * k_in
        return np.concatenate(out, axis=1)

    def save(self, path: Path) -> None:
        arrays = {}
        for i, c in enumerate(self.layers.values()):
            arrays[f"{i}.qi"], arrays[f"{i}.qo"], arrays[f"{i}.w"] = c.q_in, c.q_out, c.inv_sqrt
        save_npz(path, {"names": np.array(list(self.layers)), **arrays})

    @classmethod
    def load(cls, path: Path) -> Curvature:
        z = np.load(path)
        return cls({str(n): LayerCurvature(z[f"{i}.qi"], z[f"{i}.qo"], z[f"{i}.w"])
                    for i, n in enumerate(z["names"])})


def _bases(stats: Stats) -> dict[str, LayerCurvature]:
    bases = {}
    for name, s in stats.layers.items():
        n = max(s.tokens, 1.0)
        _, q_in = np.linalg.eigh(s.a_sum / n)
        _, q_out = np.linalg.eigh(s.s_sum / n)
        bases[name] = LayerCurvature(q_in, q_out, np.ones((len(q_out), len(q_in))))
    return bases


def _corrected(bases: dict[str, LayerCurvature], sums: list[np.ndarray], count: int, damping: float) -> Curvature:
    for acc, c in zip(sums, bases.values()):
        lam = acc / max(count, 1)
        c.inv_sqrt = 1.0 / np.sqrt(lam + damping * max(lam.mean(), 1e-30))
    return Curvature(bases)


def fit(stats: Stats, blocks, damping: float) -> Curvature:
    """Eigenbases from the factor sums, then eigenvalue corrections from raw gradient blocks.

    `blocks` is an iterable of (n, D) arrays of projected per-example gradients (the same rows the
    store will hold); `damping` is relative to each layer's mean corrected eigenvalue.
    """
    bases = _bases(stats)
    probe = Curvature(bases)
    sums = [np.zeros(shape) for shape in probe.shapes()]
    count = 0
    for g in blocks:
        for acc, r in zip(sums, probe.rotate(np.asarray(g, dtype=np.float64))):
            acc += (r ** 2).sum(0)
        count += len(g)
    return _corrected(bases, sums, count, damping)


MAX_MOMENT_DIM = 1024  # a layer's block up to 32×32 keeps its d×d moment sum at 8 MB or less


@dataclass
class Moments:
    """Σ_n vec(G_n) vec(G_n)ᵀ per layer and the example count n.

    EK-FAC's corrections in *any* eigenbasis follow from these sums, so a build that keeps them
    (with its `Stats`) can refit its curvature after rows are added without its raw gradients.
    """

    sums: list[np.ndarray]  # per layer (d, d), d = k_out·k_in
    count: int = 0

    @classmethod
    def zeros(cls, shapes: list[tuple[int, int]]) -> Moments | None:
        """None when a layer is too wide to keep its moments (exact, unprojected gradients)."""
        if any(a * b > MAX_MOMENT_DIM for a, b in shapes):
            return None
        return cls([np.zeros((a * b, a * b)) for a, b in shapes])

    def add_block(self, g: np.ndarray) -> None:
        g, col = np.asarray(g, dtype=np.float64), 0
        for acc in self.sums:
            part = g[:, col:col + len(acc)]
            acc += part.T @ part
            col += len(acc)
        self.count += len(g)

    def add(self, other: Moments) -> Moments:
        for acc, s in zip(self.sums, other.sums):
            acc += s
        self.count += other.count
        return self


def fit_moments(stats: Stats, moments: Moments, damping: float) -> Curvature:
    """`fit` from kept sums: Λ_ij = (q_out_i ⊗ q_in_j)ᵀ M (q_out_i ⊗ q_in_j) / n."""
    bases = _bases(stats)
    sums = []
    for m, c in zip(moments.sums, bases.values()):
        k_out, k_in = len(c.q_out), len(c.q_in)
        m = m.reshape(k_out, k_in, k_out, k_in)
        sums.append(np.einsum("ai,bj,abcd,ci,dj->ij", c.q_out, c.q_in, m, c.q_out, c.q_in, optimize=True))
    return _corrected(bases, sums, moments.count, damping)


def save_state(path: Path, stats: Stats, moments: Moments | None) -> None:
    """A build's reduced K-FAC sums (and gradient moments, when kept): what a refit starts from."""
    arrays = stats.arrays()
    if moments is not None:
        arrays["count"] = np.array(moments.count)
        arrays.update({f"{i}.m": m for i, m in enumerate(moments.sums)})
    save_npz(path, arrays)


def load_state(path: Path) -> tuple[Stats, Moments | None]:
    z = np.load(path)
    stats = Stats.from_arrays(z)
    if "count" not in z:
        return stats, None
    return stats, Moments([z[f"{i}.m"] for i in range(len(stats.layers))], int(z["count"]))

"""A k-means patch tokenizer: the cheapest possible VQ tokenizer, fitted in seconds on CPU.

Each image is cut into non-overlapping ``p x p`` patches. A patch's feature vector is its raw RGB
pixels scaled to [0, 1], flattened in (row, column, channel) order, so ``D = p * p * 3``; no mean
removal or whitening. The codebook is the k-means centroids of such vectors (L2), the encoder is
nearest-centroid assignment and the "decoder" paints every patch with its centroid.

Defaults: ``p = 8``, ``K = 512``, resolution 256 -> a 32 x 32 grid (1024 tokens of 9 bits per
image instead of 196,608 bytes of pixels).

Fitting (``KMeansTokenizer.fit``):

1. Draw a uniform random sample of at most ``max_patches`` patches from all input patches
   (a streaming bottom-k over per-patch random keys, so memory stays bounded for any iterable of
   batches and an array gives the same sample as the same images split into batches).
2. k-means++ seeding on a deterministic subset of ``min(n, init_sample_per_code * K)`` of them.
3. Lloyd iterations in torch over the full sample; distances via one matmul per chunk, centroid
   sums via ``index_add_``. Empty clusters are re-seeded from the points farthest from their
   centroid (largest first, ties broken by index). Stops early when no assignment changes.

Everything is seeded by ``seed`` and uses the current ``torch.get_num_threads()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.tokenizer.base import Tokenizer, register_tokenizer

__all__ = ["KMeansConfig", "KMeansTokenizer", "assign", "extract_patches", "fit_kmeans", "patches_to_images"]

_CHUNK = 32_768  # rows per distance matmul: (32768 x 512) float32 = 64 MiB
_IMAGES_PER_BATCH = 256  # when an array is given to fit(), it is streamed in slices of this many images


@dataclass(frozen=True)
class KMeansConfig:
    """Hyper-parameters of a KMeansTokenizer (all JSON-safe; stored in checkpoints and fingerprints).

    vocab_size: K, number of centroids. patch: p, patch side in px. resolution: image side in px
    (a multiple of ``patch``). iters: max Lloyd iterations. seed: RNG seed of sampling and init.
    max_patches: size of the random patch sample k-means runs on. n_fit_patches: patches actually
    used (<= max_patches; 0 when unknown). iters_run: Lloyd iterations actually run.
    """

    vocab_size: int = 512
    patch: int = 8
    resolution: int = 256
    iters: int = 20
    seed: int = 0
    max_patches: int = 200_000
    n_fit_patches: int = 0
    iters_run: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.patch < 1 or self.iters < 0 or self.max_patches < 1:
            raise ValueError(f"invalid KMeansConfig: {self}")
        if self.resolution < self.patch or self.resolution % self.patch:
            raise ValueError(f"resolution {self.resolution} is not a positive multiple of patch {self.patch}")

    @property
    def dim(self) -> int:
        """D = p * p * 3."""
        return self.patch * self.patch * 3


# ---- patch <-> image ------------------------------------------------------------------------------
def _check_images(images: np.ndarray, patch: int, resolution: int | None = None) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if h != w or h % patch:
        raise ValueError(f"images must be square with side a multiple of {patch}, got {h} x {w}")
    if resolution is not None and h != resolution:
        raise ValueError(f"images are {h} x {w} px but this tokenizer expects {resolution} x {resolution}")
    return images


def extract_patches(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H/p, W/p, p*p*3), each patch flattened (row, col, channel)."""
    n, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x).reshape(n, gh, gw, patch * patch * c)


def patches_to_images(patches: np.ndarray, patch: int) -> np.ndarray:
    """Inverse of ``extract_patches``: (N, h, w, p*p*3) -> (N, h*p, w*p, 3), dtype preserved."""
    n, gh, gw, _ = patches.shape
    x = patches.reshape(n, gh, gw, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x).reshape(n, gh * patch, gw * patch, 3)


# ---- k-means core -------------------------------------------------------------------------------
def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid under L2, in row chunks.

    x: float32 (n, D); centroids: float32 (K, D) -> (int64 (n,) index, float32 (n,) squared distance).
    Ties go to the lowest index.
    """
    c_sq = (centroids * centroids).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    dist = torch.empty(x.shape[0], dtype=torch.float32)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s : s + _CHUNK]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin, added after.
        d = torch.addmm(c_sq, xs, centroids.T, beta=1.0, alpha=-2.0)
        m, i = d.min(1)
        idx[s : s + _CHUNK] = i
        dist[s : s + _CHUNK] = (m + (xs * xs).sum(1)).clamp_min_(0.0)
    return idx, dist


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: float32 (n, D) points -> float32 (k, D) initial centroids.

    Each new centre is drawn with probability proportional to the squared distance to the nearest
    centre so far (inverse-CDF sampling with ``gen``); when all points coincide with existing centres,
    the next centre is drawn uniformly.
    """
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = torch.full((n,), float("inf"))
    for _ in range(1, k):
        c = x[chosen[-1]]
        d = (x_sq - 2.0 * (x @ c) + c.dot(c)).clamp_min_(0.0)
        torch.minimum(best, d, out=best)
        cdf = torch.cumsum(best.double(), 0)
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if cdf[-1] > 0:
            target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64)
            j = int(torch.searchsorted(cdf, target, right=True))
            chosen.append(min(j, n - 1))
        else:
            chosen.append(min(int(u * n), n - 1))
    return x[torch.tensor(chosen)].clone()


def fit_kmeans(x: torch.Tensor, k: int, iters: int, seed: int, init_sample: int) -> tuple[torch.Tensor, int]:
    """Lloyd's k-means on float32 (n, D) points -> (float32 (k, D) centroids, iterations run)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no patches to fit on")
    init_idx = torch.randperm(n, generator=gen)[: min(n, init_sample)]
    centroids = _kmeans_pp(x[init_idx], k, gen)
    prev: torch.Tensor | None = None
    iters_run = 0
    for it in range(1, iters + 1):
        iters_run = it
        idx, dist = assign(x, centroids)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        live = counts > 0
        centroids[live] = sums[live] / counts[live].unsqueeze(1).to(x.dtype)
        dead = torch.nonzero(~live).flatten()
        if dead.numel():
            # Farthest points first; a stable sort on -dist breaks ties by point index.
            far = torch.sort(-dist, stable=True).indices[: dead.numel()]
            centroids[dead[: far.numel()]] = x[far]
        if prev is not None and dead.numel() == 0 and torch.equal(prev, idx):
            break
        prev = idx
    return centroids.contiguous(), iters_run


def _sample_patches(
    batches: Iterable[np.ndarray], patch: int, max_patches: int, seed: int
) -> tuple[np.ndarray, int]:
    """Uniform sample without replacement of at most ``max_patches`` patches from a stream of batches.

    Every patch gets a uniform random key from one PCG64 stream (in input order); the patches with
    the ``max_patches`` smallest keys are kept (bottom-k). Returns (uint8 (m, D) sorted by key, side
    of the images seen).
    """
    rng = np.random.default_rng(seed)
    keep_keys = np.empty(0, dtype=np.float64)
    keep = np.empty((0, patch * patch * 3), dtype=np.uint8)
    side = None
    for batch in batches:
        batch = _check_images(batch, patch, side)
        side = batch.shape[1]
        if batch.shape[0] == 0:
            continue
        p = extract_patches(batch, patch).reshape(-1, patch * patch * 3)
        keys = rng.random(p.shape[0])
        all_keys = np.concatenate([keep_keys, keys])
        order = np.argsort(all_keys, kind="stable")[:max_patches]
        keep = np.concatenate([keep, p])[order]
        keep_keys = all_keys[order]
    if side is None:
        raise ValueError("fit() got no images")
    return keep, side


def _iter_batches(images: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got shape {images.shape}")
        for s in range(0, max(images.shape[0], 1), _IMAGES_PER_BATCH):
            yield images[s : s + _IMAGES_PER_BATCH]
    else:
        yield from images


# ---- the tokenizer --------------------------------------------------------------------------------
@register_tokenizer("kmeans")
class KMeansTokenizer(Tokenizer):
    """k-means patch VQ: ids (N, R/p, R/p) of nearest centroids; decode paints centroids back."""

    def __init__(self, config: KMeansConfig, centroids: torch.Tensor) -> None:
        """config: KMeansConfig; centroids: float (K, p*p*3) in [0, 1] pixel units, (row, col, ch) order."""
        centroids = torch.as_tensor(centroids).detach().to("cpu", torch.float32).contiguous()
        if tuple(centroids.shape) != (config.vocab_size, config.dim):
            raise ValueError(f"centroids {tuple(centroids.shape)} != ({config.vocab_size}, {config.dim})")
        if not torch.isfinite(centroids).all():
            raise ValueError("centroids contain NaN/inf")
        self.config = config
        self._centroids = centroids

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images: np.ndarray | Iterable[np.ndarray],
        vocab_size: int = 512,
        patch: int = 8,
        iters: int = 20,
        seed: int = 0,
        max_patches: int = 200_000,
        init_sample_per_code: int = 40,
    ) -> KMeansTokenizer:
        """Fit on uint8 (N, R, R, 3) images, or an iterable of such batches (all the same R).

        R (the resolution) is taken from the images and must be a multiple of ``patch``. Deterministic
        for a given seed, input and thread count (see module docstring for the algorithm).
        """
        sample, side = _sample_patches(_iter_batches(images), patch, max_patches, seed)
        x = torch.from_numpy(sample).to(torch.float32).div_(255.0)
        centroids, iters_run = fit_kmeans(x, vocab_size, iters, seed, init_sample_per_code * vocab_size)
        config = KMeansConfig(
            vocab_size=vocab_size,
            patch=patch,
            resolution=side,
            iters=iters,
            seed=seed,
            max_patches=max_patches,
            n_fit_patches=int(x.shape[0]),
            iters_run=iters_run,
        )
        return cls(config, centroids)

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> KMeansTokenizer:
        """Rebuild from ``config_dict()`` / ``state_dict()`` (unknown config keys are an error)."""
        names = {f.name for f in dataclasses.fields(KMeansConfig)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"unknown KMeansConfig keys {sorted(unknown)}")
        if set(state_dict) != {"centroids"}:
            raise ValueError(f"expected state_dict keys ['centroids'], got {sorted(state_dict)}")
        return cls(KMeansConfig(**config), state_dict["centroids"])

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"centroids": self._centroids}

    # ---- interface ----------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def grid(self) -> tuple[int, int]:
        g = self.config.resolution // self.config.patch
        return (g, g)

    @property
    def codebook(self) -> torch.Tensor:
        """float32 (K, p*p*3) centroids, pixel values in [0, 1], (row, col, channel) order."""
        return self._centroids

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R, 3) -> int64 (N, R/p, R/p) nearest-centroid ids (ties: lowest id)."""
        images = _check_images(images, self.config.patch, self.config.resolution)
        n = images.shape[0]
        gh, gw = self.grid
        out = np.empty((n, gh, gw), dtype=np.int64)
        per = max(1, _CHUNK // (gh * gw))
        for s in range(0, n, per):
            p = extract_patches(images[s : s + per], self.config.patch)
            x = torch.from_numpy(p.reshape(-1, self.config.dim)).to(torch.float32).div_(255.0)
            idx, _ = assign(x, self._centroids)
            out[s : s + per] = idx.numpy().reshape(-1, gh, gw)
        return out

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Integer (N, R/p, R/p) ids -> uint8 (N, R, R, 3): each patch painted with its centroid."""
        ids = self.check_ids(ids)
        lut = (self._centroids.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)  # (K, D)
        return patches_to_images(lut[ids.astype(np.int64)], self.config.patch)

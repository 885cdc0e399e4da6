"""Three k-means patch tokenizers beyond plain k-means (``pipeline.tokenizer.kmeans``), each one id grid per image.

``kmeans_zca`` (Coates, Lee and Ng, AISTATS 2011): every 8x8x3 patch is contrast-normalised (its own
mean removed, divided by sqrt(variance + 10 / 255^2)), then ZCA-whitened (eigenvalues floored by
``zca_eps``); k-means runs in the whitened space, so edges and texture weigh as much as the low
frequencies that dominate raw pixels. The patch's own mean and contrast are not coded: ``decode``
paints un-whitened centroids at the fitted patches' mean brightness and contrast (a grey-level sketch).
``codebook`` is the whitened centroids (what the ids mean to augmentation).

``kmeans_residual``: two-stage residual k-means. Stage 1 is plain k-means on raw patches (K1 codes),
stage 2 k-means on what stage 1 leaves (K2 codes); a patch's id is ``i1 * K2 + i2`` (K = K1 * K2) and
its embedding ``c1[i1] + c2[i2]``: K1 * K2 reconstructions for the cost of K1 + K2 centroids.

``luma_chroma``: JPEG's split. Luma (ITU-R 601 Y) is coded per 8x8 patch (Kl codes), chroma (Cb, Cr,
averaged over 2x2 pixels as JPEG's 4:2:0) per 16x16 px cell (Kc codes), and each luma token carries the
chroma code of the cell it lies in: id = ``l * Kc + c`` (K = Kl * Kc). Its embedding is the luma centroid
(64 values) followed by the chroma centroid (8x8x2 = 128 values of the cell).

All three: resolution R (a multiple of 16 for luma_chroma), patch p = 8, grid R / 8; fitted by
``fit(images, vocab_size=K, ...)`` on uint8 (N, R, R, 3) images with the k-means core of
``pipeline.tokenizer.kmeans`` (seeded, deterministic for a thread count); checkpoints and fingerprints as
every tokenizer's (``pipeline.tokenizer.base``), so the tokenise job takes them with ``--tokenizer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.tokenizer.base import Tokenizer, register_tokenizer
from pipeline.tokenizer.kmeans import _check_images, assign, extract_patches, fit_kmeans, patches_to_images

__all__ = ["ZCAKMeansTokenizer", "ResidualKMeansTokenizer", "LumaChromaTokenizer"]

PATCH = 8
_INIT_PER_CODE = 40


def _sample(x: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """At most ``max_rows`` rows of ``x``, a seeded uniform sample in input order."""
    if len(x) <= max_rows:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))]


def _fit(x: np.ndarray, k: int, iters: int, seed: int) -> torch.Tensor:
    """k-means centroids float32 (k, D) of float rows ``x`` (n, D)."""
    centroids, _ = fit_kmeans(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), k, iters, seed,
                              _INIT_PER_CODE * k)
    return centroids


def _assign(x: np.ndarray, centroids: torch.Tensor) -> np.ndarray:
    return assign(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), centroids)[0].numpy()


class _PatchTokenizer(Tokenizer):
    """What the three share: config (resolution, vocab sizes, seeds) and tensors as state; grid R / 8."""

    tensor_names: tuple[str, ...] = ()

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.tensor_names):
            raise ValueError(f"{self.kind}: expected tensors {sorted(self.tensor_names)}, got {sorted(tensors)}")
        self.config = dict(config)
        self.tensors = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous()
                        for k, v in tensors.items()}
        if any(not torch.isfinite(t).all() for t in self.tensors.values()):
            raise ValueError(f"{self.kind}: weights contain NaN/inf")
        if self.config["resolution"] % 16 or self.config["resolution"] < 16:
            raise ValueError(f"{self.kind}: resolution must be a positive multiple of 16, got "
                             f"{self.config['resolution']}")

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Tokenizer:
        return cls(config, state_dict)

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    @property
    def grid(self) -> tuple[int, int]:
        return (self.resolution // PATCH,) * 2

    def _patches(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> float32 (N, h, w, 192) patches in [0, 1]."""
        return extract_patches(_check_images(images, PATCH, self.resolution), PATCH).astype(np.float32) / 255.0


# ---- Coates and Ng: contrast-normalised, ZCA-whitened patches ----------------------------------------
@register_tokenizer("kmeans_zca")
class ZCAKMeansTokenizer(_PatchTokenizer):
    tensor_names = ("centroids", "mean", "whiten", "unwhiten", "scale")

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 10.0 / 255.0**2)

    @classmethod
    def fit(cls, images: np.ndarray, vocab_size: int = 512, iters: int = 20, seed: int = 0,
            max_patches: int = 200_000, zca_eps: float = 0.1) -> ZCAKMeansTokenizer:
        raw = extract_patches(_check_images(images, PATCH), PATCH).reshape(-1, PATCH * PATCH * 3)
        raw = _sample(raw, max_patches, seed).astype(np.float32) / 255.0
        x = cls._normalise(raw)
        mean = x.mean(0)
        vals, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        vals = np.maximum(vals, 0.0)
        whiten = (vecs / np.sqrt(vals + zca_eps)) @ vecs.T
        unwhiten = (vecs * np.sqrt(vals + zca_eps)) @ vecs.T
        centroids = _fit((x - mean) @ whiten, vocab_size, iters, seed)
        scale = torch.tensor([raw.mean(), np.sqrt(raw.var(-1).mean() + 10.0 / 255.0**2)])  # mean grey, mean contrast
        config = {"resolution": images.shape[1], "vocab_size": vocab_size, "iters": iters, "seed": seed,
                  "max_patches": max_patches, "zca_eps": zca_eps}
        return cls(config, {"centroids": centroids, "mean": torch.from_numpy(mean),
                            "whiten": torch.from_numpy(whiten), "unwhiten": torch.from_numpy(unwhiten), "scale": scale})

    @property
    def codebook(self) -> torch.Tensor:
        return self.tensors["centroids"]

    def encode(self, images: np.ndarray) -> np.ndarray:
        p = self._patches(images)
        x = self._normalise(p.reshape(-1, p.shape[-1])) - self.tensors["mean"].numpy()
        x = x @ self.tensors["whiten"].numpy()
        return _assign(x, self.codebook).reshape(p.shape[:3]).astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = self.check_ids(ids).astype(np.int64)
        shape = (self.codebook.numpy() @ self.tensors["unwhiten"].numpy()) + self.tensors["mean"].numpy()
        grey, contrast = (float(v) for v in self.tensors["scale"])
        lut = np.clip((shape * contrast + grey) * 255.0, 0, 255).round().astype(np.uint8)
        return patches_to_images(lut[ids], PATCH)


# ---- two-stage residual k-means ----------------------------------------------------------------------
@register_tokenizer("kmeans_residual")
class ResidualKMeansTokenizer(_PatchTokenizer):
    tensor_names = ("stage1", "stage2")

    @classmethod
    def fit(cls, images: np.ndarray, vocab_size: int = 2048, stage2: int = 4, iters: int = 20, seed: int = 0,
            max_patches: int = 200_000) -> ResidualKMeansTokenizer:
        if vocab_size % stage2:
            raise ValueError(f"vocab_size {vocab_size} must be a multiple of the second stage's {stage2} codes")
        x = extract_patches(_check_images(images, PATCH), PATCH).reshape(-1, PATCH * PATCH * 3)
        x = _sample(x, max_patches, seed).astype(np.float32) / 255.0
        c1 = _fit(x, vocab_size // stage2, iters, seed)
        c2 = _fit(x - c1[torch.from_numpy(_assign(x, c1))].numpy(), stage2, iters, seed + 1)
        config = {"resolution": images.shape[1], "vocab_size": vocab_size, "stage2": stage2, "iters": iters,
                  "seed": seed, "max_patches": max_patches}
        return cls(config, {"stage1": c1, "stage2": c2})

    @property
    def codebook(self) -> torch.Tensor:
        """float32 (K1 * K2, 192): row i1 * K2 + i2 is c1[i1] + c2[i2], pixels in [0, 1]."""
        both = self.tensors["stage1"][:, None, :] + self.tensors["stage2"][None, :, :]
        return both.reshape(-1, PATCH * PATCH * 3)

    def encode(self, images: np.ndarray) -> np.ndarray:
        p = self._patches(images)
        x = p.reshape(-1, p.shape[-1])
        i1 = _assign(x, self.tensors["stage1"])
        i2 = _assign(x - self.tensors["stage1"].numpy()[i1], self.tensors["stage2"])
        return (i1 * self.config["stage2"] + i2).reshape(p.shape[:3]).astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = self.check_ids(ids).astype(np.int64)
        lut = np.clip(self.codebook.numpy() * 255.0, 0, 255).round().astype(np.uint8)
        return patches_to_images(lut[ids], PATCH)


# ---- luma at 8x8, chroma at 16x16 (JPEG's 4:2:0) -------------------------------------------------------
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)


@register_tokenizer("luma_chroma")
class LumaChromaTokenizer(_PatchTokenizer):
    tensor_names = ("luma", "chroma")

    @staticmethod
    def _split(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, R, R, 3) -> (luma patches (N, R/8, R/8, 64), chroma cells (N, R/16, R/16, 128)), in
        [0, 1] (chroma centred on 0.5): each chroma cell is 16x16 px of Cb, Cr averaged over 2x2 px."""
        ycc = images.astype(np.float32) @ (_TO_YCC.T / 255.0) + np.array([0.0, 0.5, 0.5], np.float32)
        n, r = ycc.shape[:2]
        luma = ycc[..., 0].reshape(n, r // 8, 8, r // 8, 8).transpose(0, 1, 3, 2, 4).reshape(n, r // 8, r // 8, 64)
        half = ycc[..., 1:].reshape(n, r // 2, 2, r // 2, 2, 2).mean((2, 4))  # (N, R/2, R/2, 2)
        chroma = half.reshape(n, r // 16, 8, r // 16, 8, 2).transpose(0, 1, 3, 2, 4, 5)
        chroma = chroma.reshape(n, r // 16, r // 16, 128)
        return luma, chroma

    @classmethod
    def fit(cls, images: np.ndarray, vocab_size: int = 2048, chroma_codes: int = 8, iters: int = 20, seed: int = 0,
            max_patches: int = 200_000) -> LumaChromaTokenizer:
        if vocab_size % chroma_codes:
            raise ValueError(f"vocab_size {vocab_size} must be a multiple of the {chroma_codes} chroma codes")
        luma, chroma = cls._split(_check_images(images, 16))
        cl = _fit(_sample(luma.reshape(-1, 64), max_patches, seed), vocab_size // chroma_codes, iters, seed)
        cc = _fit(_sample(chroma.reshape(-1, 128), max_patches // 4, seed), chroma_codes, iters, seed + 1)
        config = {"resolution": images.shape[1], "vocab_size": vocab_size, "chroma_codes": chroma_codes,
                  "iters": iters, "seed": seed, "max_patches": max_patches}
        return cls(config, {"luma": cl, "chroma": cc})

    @property
    def codebook(self) -> torch.Tensor:
        """float32 (Kl * Kc, 192): row l * Kc + c is [luma centroid l (64), chroma centroid c (128)]."""
        kl, kc = self.tensors["luma"].shape[0], self.tensors["chroma"].shape[0]
        return torch.cat([self.tensors["luma"][:, None, :].expand(kl, kc, 64),
                          self.tensors["chroma"][None, :, :].expand(kl, kc, 128)], -1).reshape(kl * kc, 192)

    def encode(self, images: np.ndarray) -> np.ndarray:
        luma, chroma = self._split(_check_images(images, PATCH, self.resolution))
        n, g = luma.shape[:2]
        lid = _assign(luma.reshape(-1, 64), self.tensors["luma"]).reshape(n, g, g)
        cid = _assign(chroma.reshape(-1, 128), self.tensors["chroma"]).reshape(n, g // 2, g // 2)
        return (lid * self.config["chroma_codes"] + np.kron(cid, np.ones((1, 2, 2), np.int64))).astype(np.int64)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        ids = self.check_ids(ids).astype(np.int64)
        kc = self.config["chroma_codes"]
        n, g = ids.shape[:2]
        y = self.tensors["luma"].numpy()[ids // kc].reshape(n, g, g, 8, 8).transpose(0, 1, 3, 2, 4)
        y = y.reshape(n, g * 8, g * 8)
        cells = self.tensors["chroma"].numpy()[ids[:, ::2, ::2] % kc].reshape(n, g // 2, g // 2, 8, 8, 2)
        half = cells.transpose(0, 1, 3, 2, 4, 5).reshape(n, g * 4, g * 4, 2)
        cbcr = half.repeat(2, 1).repeat(2, 2) - 0.5
        ycc = np.concatenate([y[..., None], cbcr], -1)
        rgb = ycc @ np.linalg.inv(_TO_YCC).T.astype(np.float32)
        return np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8)

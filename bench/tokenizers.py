"""Fit a registered tokenizer kind on a train split for the learning benchmark (``--tokenizer-kind``,
``--token-variants RES:K:KIND``): the tokens are then made by the tokenise job with ``--tokenizer``.

    fit_tokenizer("kmeans_residual", Path("train"), 256, 2048, Path("out/tokenizer.pt"))

Kinds: ``kmeans`` (plain k-means, what the tokenise job fits itself), and the variants of
``pipeline.tokenizer.kmeans_variants``: ``kmeans_zca`` (K codes of contrast-normalised, ZCA-whitened
patches), ``kmeans_residual`` (K / 4 first-stage codes x 4 residual codes), ``luma_chroma`` (K / 8 luma
codes x 8 chroma codes). Fitted on ``images`` train images spread evenly over the sorted files (every class),
decoded at ``resolution`` px (the tokenise job's view); reused when ``out`` exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.images import list_images, load_resized

FIT_IMAGES = 1000  # the tokenise job's --fit-images default


def tokenizer_class(kind: str):
    from pipeline.tokenizer.kmeans import KMeansTokenizer
    from pipeline.tokenizer.kmeans_variants import LumaChromaTokenizer, ResidualKMeansTokenizer, ZCAKMeansTokenizer

    classes = {"kmeans": KMeansTokenizer, "kmeans_zca": ZCAKMeansTokenizer, "kmeans_residual": ResidualKMeansTokenizer,
               "luma_chroma": LumaChromaTokenizer}
    if kind not in classes:
        raise SystemExit(f"error: unknown tokenizer kind {kind!r}; kinds: {', '.join(sorted(classes))}")
    return classes[kind]


def fit_tokenizer(kind: str, train: Path, resolution: int, vocab: int, out: Path, images: int = FIT_IMAGES,
                  seed: int = 0) -> Path:
    """Fit ``kind`` with K = ``vocab`` on ``train`` at ``resolution`` px and save it to ``out``; returns ``out``."""
    if out.exists():
        return out
    paths = list_images(train)
    if len(paths) > images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, images).round().astype(int)]
    tokenizer = tokenizer_class(kind).fit(load_resized(paths, resolution), vocab_size=vocab, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    return out

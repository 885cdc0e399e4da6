"""Image tokenizers: one interface (``Tokenizer``), checkpoint loading and the k-means baseline."""

from pipeline.tokenizer.base import (
    Tokenizer,
    codebook_perplexity,
    fingerprint_of,
    load_tokenizer,
    psnr,
    register_tokenizer,
)
from pipeline.tokenizer.kmeans import KMeansConfig, KMeansTokenizer

__all__ = [
    "KMeansConfig",
    "KMeansTokenizer",
    "Tokenizer",
    "codebook_perplexity",
    "fingerprint_of",
    "load_tokenizer",
    "psnr",
    "register_tokenizer",
]

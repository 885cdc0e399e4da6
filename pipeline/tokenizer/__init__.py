"""Image tokenizers: one interface (``Tokenizer``), checkpoint loading and the k-means baseline."""

from pipeline.tokenizer.base import (
    Tokenizer,
    TokenizerFingerprintMismatch,
    codebook_perplexity,
    fingerprint_of,
    load_tokenizer,
    psnr,
    register_tokenizer,
)
from pipeline.tokenizer.kmeans import KMeansConfig, KMeansTokenizer
from pipeline.tokenizer.vqgan import VQGANConfig, VQGANTokenizer  # noqa: F401  (registers kind "vqgan")

__all__ = [
    "KMeansConfig",
    "KMeansTokenizer",
    "Tokenizer",
    "TokenizerFingerprintMismatch",
    "codebook_perplexity",
    "fingerprint_of",
    "load_tokenizer",
    "psnr",
    "register_tokenizer",
]

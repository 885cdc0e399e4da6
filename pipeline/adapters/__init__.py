"""Token-space adapters: models that transform token grids without decoding them to pixels."""

from pipeline.adapters.tokenadapt import (
    TokenAdapt,
    TokenAdaptConfig,
    correction_gate,
    identity_theta,
    load_tokenadapt,
    naive_adapt,
    nearest_code,
    sample_affine,
    save_tokenadapt,
    warp,
    warp_images,
)

__all__ = [
    "TokenAdapt",
    "TokenAdaptConfig",
    "correction_gate",
    "identity_theta",
    "load_tokenadapt",
    "naive_adapt",
    "nearest_code",
    "sample_affine",
    "save_tokenadapt",
    "warp",
    "warp_images",
]

"""A VQGAN tokenizer (taming-transformers architecture) with L2 or cosine quantisation.

    images uint8 (N, R, R, 3) -> float [-1, 1] -> encoder -> quant_conv -> nearest code -> ids int64 (N, R/f, R/f)
    ids -> codebook rows -> post_quant_conv -> decoder -> clamp [-1, 1] -> uint8 (N, R, R, 3)

The network is ``vqgan_modules.VQModel``, whose ``state_dict`` uses taming's key names, so real taming
checkpoints load with ``VQGANTokenizer.from_taming_checkpoint``. Our own checkpoints go through the
base class ``save`` / ``load_tokenizer`` (``{"kind": "vqgan", "config", "state_dict"}``).

Quantisation (``VQGANConfig.quantize``):

* ``"l2"``: taming's ``VectorQuantizer``: argmin_k ||z - e_k||^2.
* ``"cosine"``: SeiT / ViT-VQGAN style: argmax_k <z/|z|, e_k/|e_k|>.

Ties go to the lowest id. ``decode``/``embed`` always use the stored codebook rows as they are (for
a cosine-trained codebook those rows are normally already unit-norm).

Codebook restriction (SeiT's storage budgets): ``restrict(keep, counts=... | ids=...)`` keeps the
``keep`` most used codes (ties: lower id) and returns a tokenizer whose vocabulary is 0..keep-1, new id
``j`` being old id ``parent_ids[j]`` (ordered by decreasing usage). Its encoder maps to the nearest
kept code. ``remap_ids`` turns ids of the full codebook into ids of the restricted one (nearest kept
code by the same metric; kept codes map to themselves).

Presets: ``tiny_preset`` (CPU tests), ``seit_preset`` (f8, 32x32 at 256 px) and ``addp_preset``
(taming's ImageNet f16-1024: 16x16 at 256 px).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.tokenizer.base import Tokenizer, register_tokenizer
from pipeline.tokenizer.vqgan_modules import VQGANConfig, VQModel

__all__ = [
    "VQGANConfig",
    "VQGANTokenizer",
    "addp_preset",
    "nearest_codes",
    "restriction_lut",
    "seit_preset",
    "tiny_preset",
]

_ROWS = 16_384  # latent vectors per distance matmul (16384 x 8192 float32 = 512 MiB at most)
_PARENT_KEY = "restriction.parent_ids"  # extra state_dict entry of restricted tokenizers


# ---- presets --------------------------------------------------------------------------------------
def tiny_preset(resolution: int = 32, n_embed: int = 64, quantize: str = "l2") -> VQGANConfig:
    """CPU-test sized VQGAN: f2 (ch_mult (1, 2)), one attention level at 16 px; 16x16 grid at 32 px."""
    return VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=resolution,
                       z_channels=32, embed_dim=16, n_embed=n_embed, quantize=quantize)


def seit_preset(n_embed: int = 8192, quantize: str = "cosine") -> VQGANConfig:
    """SeiT-like budget: f8 (ch_mult (1, 1, 2, 4), 3 downsamplings) -> 32x32 tokens at 256 px.

    SeiT itself uses a ViT-VQGAN (transformer) with K = 8192 l2-normalised 32-d codes; this is the
    convolutional taming analogue with the same grid, K, code dimension and cosine quantisation
    (ch/z_channels/attention follow taming's f8 configs).
    """
    return VQGANConfig(ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256,
                       z_channels=256, embed_dim=32, n_embed=n_embed, quantize=quantize)


def addp_preset(quantize: str = "l2") -> VQGANConfig:
    """taming's ImageNet VQGAN f16, 1024 codes (``vqgan_imagenet_f16_1024``): 16x16 tokens at 256 px."""
    return VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
                       z_channels=256, embed_dim=256, n_embed=1024, quantize=quantize)


# ---- quantisation ---------------------------------------------------------------------------------
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """float (n, D) vectors, float (K, D) codebook -> int64 (n,) nearest code per row (ties: lowest id).

    metric "l2": argmin ||z - e||^2; "cosine": argmax of the dot product of L2-normalised z and e.
    Computed in row chunks so memory stays at most ``_ROWS x K`` floats.
    """
    z = z.to(codebook.dtype)
    if metric == "cosine":
        cb = torch.nn.functional.normalize(codebook, dim=1)
    elif metric == "l2":
        cb = codebook
        cb_sq = (cb * cb).sum(1)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s in range(0, z.shape[0], _ROWS):
        zs = z[s : s + _ROWS]
        if metric == "cosine":
            out[s : s + _ROWS] = (torch.nn.functional.normalize(zs, dim=1) @ cb.T).argmax(1)
        else:  # ||z||^2 is constant per row and does not change the argmin
            out[s : s + _ROWS] = torch.addmm(cb_sq, zs, cb.T, beta=1.0, alpha=-2.0).argmin(1)
    return out


def restriction_lut(codebook: torch.Tensor, parent_ids: torch.Tensor, metric: str) -> torch.Tensor:
    """int64 (K,) table: full id -> restricted id (nearest kept code by ``metric``; kept codes -> themselves).

    codebook: float (K, D) full codebook; parent_ids: int64 (K',) full ids of the kept codes, in
    restricted-id order.
    """
    parent_ids = torch.as_tensor(parent_ids, dtype=torch.long)
    lut = nearest_codes(codebook, codebook[parent_ids], metric)
    lut[parent_ids] = torch.arange(parent_ids.numel())
    return lut


def _usage_counts(k: int, counts: Any, ids: Any) -> torch.Tensor:
    if (counts is None) == (ids is None):
        raise ValueError("give exactly one of counts= (length-K usage histogram) or ids= (a sample of ids)")
    if counts is not None:
        c = torch.as_tensor(np.asarray(counts), dtype=torch.float64).reshape(-1)
        if c.numel() != k or bool((c < 0).any()):
            raise ValueError(f"counts must be {k} non-negative numbers, got shape {tuple(c.shape)}")
        return c
    flat = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= k):
        raise ValueError(f"ids out of range [0, {k})")
    return torch.bincount(flat, minlength=k).to(torch.float64)


def _first(names: set[str], n: int = 10) -> str:
    s = sorted(names)
    return f"{len(s)}: {s[:n]}" + (" ..." if len(s) > n else "")


# ---- the tokenizer --------------------------------------------------------------------------------
@register_tokenizer("vqgan")
class VQGANTokenizer(Tokenizer):
    """VQGAN tokenizer: ids (N, R/f, R/f) of nearest codes; decode runs the VQGAN decoder.

    Inference only: the model is kept in eval mode and every call runs under ``torch.inference_mode``,
    in batches of ``batch_size`` images, on the model's device (``to(device)``).
    """

    def __init__(self, config: VQGANConfig, model: VQModel | None = None, seed: int = 0,
                 parent_ids: torch.Tensor | None = None, batch_size: int = 16) -> None:
        """config: the VQGANConfig; model: weights (None -> fresh taming-style init seeded by ``seed``,
        without touching the global RNG); parent_ids: int64 (K,) for a restricted tokenizer: the
        ids its codes had in the tokenizer it was restricted from."""
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = VQModel(config)
        if model.cfg != config:
            raise ValueError("model was built for a different config")
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size
        if parent_ids is not None:
            parent_ids = torch.as_tensor(parent_ids, dtype=torch.long).cpu()
            if parent_ids.shape != (config.n_embed,):
                raise ValueError(f"parent_ids must have shape ({config.n_embed},), got {tuple(parent_ids.shape)}")
        self.parent_ids = parent_ids

    def to(self, device: str | torch.device) -> VQGANTokenizer:
        """Move the network to ``device`` (in place); returns self."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

    # ---- persistence --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def live_weights(self) -> dict[str, torch.Tensor]:
        """The network's weights where they are (no copies), plus the extra tensors ``state_dict`` stores."""
        sd = dict(self.model.state_dict())
        if self.parent_ids is not None:
            sd[_PARENT_KEY] = self.parent_ids
        return sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        """taming-named weights (CPU), plus ``restriction.parent_ids`` for restricted tokenizers."""
        return {k: v.detach().cpu() for k, v in self.live_weights().items()}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> VQGANTokenizer:
        """Rebuild from ``config_dict()`` / ``state_dict()``; unknown config keys or weights are errors."""
        names = {f.name for f in dataclasses.fields(VQGANConfig)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys {sorted(unknown)}")
        cfg = VQGANConfig(**config)
        sd = dict(state_dict)
        parent = sd.pop(_PARENT_KEY, None)
        return cls(cfg, _load_model(cfg, sd, source="state_dict"), parent_ids=parent)

    @classmethod
    def from_taming_checkpoint(cls, path: str | Path, config: VQGANConfig | Mapping[str, Any]) -> VQGANTokenizer:
        """Load a CompVis/taming-transformers VQModel checkpoint (``.ckpt``) for the given architecture.

        Read with ``torch.load(weights_only=True)``; weights are taken from ``ckpt["state_dict"]`` when
        present (Lightning checkpoints), else the file must itself be the state dict. ``loss.*`` entries
        (discriminator, LPIPS) are ignored; any other missing/unexpected key or shape mismatch -> ValueError.
        """
        cfg = config if isinstance(config, VQGANConfig) else VQGANConfig(**config)
        try:
            ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # e.g. Lightning hparams pickled as OmegaConf objects
            raise ValueError(f"{path}: not loadable with weights_only=True; re-save only its 'state_dict' ({e})") from e
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path}: no state dict of tensors found")
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
        return cls(cfg, _load_model(cfg, sd, source=str(path)))

    # ---- interface ----------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid_side, self.config.grid_side)

    @property
    def codebook(self) -> torch.Tensor:
        """float32 (K, D) CPU copy of ``quantize.embedding.weight``."""
        return self.model.quantize.embedding.weight.detach().to("cpu", torch.float32)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R, 3) RGB -> int64 (N, R/f, R/f) ids in [0, K) (nearest code by ``config.quantize``)."""
        images, g = self.check_images(images), self.config.grid_side
        out = np.empty((images.shape[0], g, g), dtype=np.int64)
        cb = self.model.quantize.embedding.weight
        with torch.inference_mode():
            for s in range(0, images.shape[0], self.batch_size):
                x = torch.from_numpy(images[s : s + self.batch_size]).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, R, R) in [-1, 1]
                z = self.model.encode_latents(x)  # (B, D, g, g)
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                out[s : s + self.batch_size] = nearest_codes(flat, cb, self.config.quantize).view(-1, g, g).cpu()
        return out

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Integer (N, R/f, R/f) ids in [0, K) -> uint8 (N, R, R, 3) reconstructions (rounded)."""
        ids = self.check_ids(ids)
        out = np.empty((ids.shape[0], self.resolution, self.resolution, 3), dtype=np.uint8)
        cb = self.model.quantize.embedding.weight
        with torch.inference_mode():
            for s in range(0, ids.shape[0], self.batch_size):
                t = torch.from_numpy(ids[s : s + self.batch_size].astype(np.int64)).to(self.device)
                zq = cb[t].permute(0, 3, 1, 2)  # (B, D, g, g)
                x = self.model.decode_codes(zq).clamp_(-1.0, 1.0)
                x = x.add_(1.0).mul_(127.5).round_().to(torch.uint8).permute(0, 2, 3, 1)
                out[s : s + self.batch_size] = x.cpu().numpy()
        return out

    # ---- codebook restriction -----------------------------------------------------------------------
    def restrict(self, keep: int, *, counts: Any = None, ids: Any = None) -> VQGANTokenizer:
        """Keep the ``keep`` most used codes -> new tokenizer with vocabulary 0..keep-1.

        Give either ``counts`` (length-K usage histogram) or ``ids`` (any-shape sample of ids from this
        tokenizer). New id j is old id ``parent_ids[j]`` (ids of *this* tokenizer), ordered by decreasing
        usage (ties: lower old id). Weights are copied, so the two tokenizers are independent.
        """
        k = self.vocab_size
        if not 1 <= keep <= k:
            raise ValueError(f"keep must be in [1, {k}], got {keep}")
        usage = _usage_counts(k, counts, ids)
        order = torch.sort(-usage, stable=True).indices[:keep]
        cfg = dataclasses.replace(self.config, n_embed=keep)
        sd = self.state_dict()
        sd.pop(_PARENT_KEY, None)
        sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][order].clone()
        model = _load_model(cfg, sd, source="restrict").to(self.device)
        return VQGANTokenizer(cfg, model, parent_ids=order, batch_size=self.batch_size)

    def remap_ids(self, ids: np.ndarray, restricted: VQGANTokenizer) -> np.ndarray:
        """Ids of this tokenizer (any shape) -> int64 ids of ``restricted`` (made by ``self.restrict``).

        Each id goes to the nearest kept code (by ``restricted.config.quantize``); kept ids map exactly.
        """
        if restricted.parent_ids is None or not torch.equal(restricted.codebook, self.codebook[restricted.parent_ids]):
            raise ValueError("`restricted` was not made by restrict() on this tokenizer")
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids out of range [0, {self.vocab_size})")
        lut = restriction_lut(self.codebook, restricted.parent_ids, restricted.config.quantize).numpy()
        return lut[ids.astype(np.int64)]


def _load_model(cfg: VQGANConfig, sd: Mapping[str, torch.Tensor], source: str) -> VQModel:
    """Build VQModel(cfg) and load ``sd`` strictly, with a readable error listing key/shape problems."""
    with torch.random.fork_rng(devices=[]):
        model = VQModel(cfg)
    want = model.state_dict()
    missing, unexpected = set(want) - set(sd), set(sd) - set(want)
    shapes = {k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape)}
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        if shapes:
            bad = sorted(shapes)[:10]
            parts.append(f"shape mismatches {len(shapes)}: "
                         + ", ".join(f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in bad))
        raise ValueError(f"{source}: weights do not match the VQGAN config: " + "; ".join(parts))
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model

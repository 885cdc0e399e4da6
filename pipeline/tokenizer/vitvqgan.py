"""SeiT's tokenizer: the ViT-VQGAN of thuanz123/enhancing-transformers, under our ``Tokenizer`` interface.

    tok = ViTVQGANTokenizer.from_enhancing_checkpoint("vitvqgan.ckpt", codebook="codebook.ckpt")
    ids = tok.encode(images)     # uint8 (N, 256, 256, 3) -> int64 (N, 32, 32), SeiT's ids
    images = tok.decode(ids)     # -> uint8 (N, 256, 256, 3)
    tok.save("tokenizer.pt")     # our checkpoint: vqpt tokenise --tokenizer tokenizer.pt (e.g. ADE20K)

    images uint8 -> [0, 1] -> encoder -> pre_quant -> nearest code by cosine -> ids
    ids -> code rows -> L2-normalise -> post_quant -> decoder -> clamp [0, 1] -> uint8

Checkpoints read (always ``torch.load(weights_only=True)``): a Lightning checkpoint of ``ViTVQ`` (weights
under ``"state_dict"``) or a bare state dict, with any prefix before ``encoder.`` (``model.``,
``module.``) removed. The architecture is read off the weights' shapes (widths, depths, heads at 64
channels per head, patch and image size), so base, small and large all load. ``loss.*`` entries are
dropped (training only); anything else missing or unexpected is a ValueError listing the keys.
SeiT's own ``tokenizer.ckpt`` is a *pickled module*, which we do not unpickle: re-save its state dict
once where enhancing-transformers is importable (``docs/seit.md`` gives the one line).

SeiT's codebook subset: SeiT keeps K = 391 of the 8,192 codes (``codebook.ckpt``, float (391, 32)) and
tokenises by the nearest of those by cosine (``util/misc.py convert_to_tokens``). Passing ``codebook=``
restricts this tokenizer to exactly those rows, in their order, so its ids *are* SeiT's ids; each kept
row's id in the full codebook is recorded in ``parent_ids`` (-1 where no full-codebook row matches).
``synonyms`` (int64 (K, S), SeiT's ``synonyms.json``) may ride along for synonym replacement.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tokenizer.base import Tokenizer, register_tokenizer
from pipeline.tokenizer.codebook_only import read_codebook
from pipeline.tokenizer.vitvqgan_modules import ViTVQ, ViTVQGANConfig

__all__ = ["ViTVQGANTokenizer", "config_from_state_dict", "load_state"]

_PARENT_KEY = "restriction.parent_ids"
_SYNONYM_KEY = "synonyms"
_ANCHOR = "encoder.to_patch_embedding.0.weight"


def _layers(sd: Mapping[str, torch.Tensor], part: str) -> int:
    prefix = f"{part}.transformer.layers."
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def config_from_state_dict(sd: Mapping[str, torch.Tensor], dim_head: int = 64) -> ViTVQGANConfig:
    """The ``ViTVQGANConfig`` whose parameters have the shapes in ``sd`` (enhancing-transformers keys)."""
    try:
        patch = sd[_ANCHOR]  # (enc_dim, 3, p, p)
        codes = sd["quantizer.embedding.weight"]  # (n_embed, embed_dim)
        side = int(np.sqrt(sd["encoder.en_pos_embedding"].shape[1]))
        return ViTVQGANConfig(
            image_size=side * patch.shape[-1], patch_size=patch.shape[-1],
            enc_dim=patch.shape[0], enc_depth=_layers(sd, "encoder"),
            enc_heads=sd["encoder.transformer.layers.0.0.fn.to_qkv.weight"].shape[0] // (3 * dim_head),
            enc_mlp_dim=sd["encoder.transformer.layers.0.1.fn.net.0.weight"].shape[0],
            dec_dim=sd["post_quant.weight"].shape[0], dec_depth=_layers(sd, "decoder"),
            dec_heads=sd["decoder.transformer.layers.0.0.fn.to_qkv.weight"].shape[0] // (3 * dim_head),
            dec_mlp_dim=sd["decoder.transformer.layers.0.1.fn.net.0.weight"].shape[0],
            dim_head=dim_head, embed_dim=codes.shape[1], n_embed=codes.shape[0])
    except KeyError as err:
        raise ValueError(f"not a ViT-VQGAN (enhancing-transformers ViTVQ) state dict: no {err}") from None


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ViTVQ weights of a checkpoint file: Lightning ``["state_dict"]`` or bare, prefix and ``loss.*`` removed."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds pickled Python objects (SeiT's tokenizer.ckpt is a pickled module, "
                         "Lightning checkpoints may pickle hyper-parameters), which vqpt never loads; re-save its "
                         "state dict once (docs/seit.md) and load that") from err
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: no state dict found")
    anchors = [k for k in sd if k.endswith(_ANCHOR)]
    if not anchors:
        raise ValueError(f"{path}: no '{_ANCHOR}': not a ViT-VQGAN checkpoint")
    prefix = anchors[0][: -len(_ANCHOR)]
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("loss.") and isinstance(v, torch.Tensor)}


def _parent_ids(full: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """int64 (K',): the full-codebook row each subset row is (same direction to 1e-5), else -1."""
    sim = F.normalize(subset.double(), dim=1) @ F.normalize(full.double(), dim=1).T
    best, idx = sim.max(1)
    return torch.where(best > 1 - 1e-5, idx, torch.full_like(idx, -1))


@register_tokenizer("vitvqgan")
class ViTVQGANTokenizer(Tokenizer):
    """ViT-VQGAN tokenizer: ids (N, R/p, R/p) of the nearest code by cosine; decode runs the ViT decoder.

    Inference only (eval mode, ``torch.inference_mode``), ``batch_size`` images per forward pass, on
    the model's device (``to(device)``).
    """

    def __init__(self, config: ViTVQGANConfig, model: ViTVQ | None = None, seed: int = 0,
                 parent_ids: torch.Tensor | None = None, synonyms: torch.Tensor | None = None,
                 batch_size: int = 16) -> None:
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = ViTVQ(config)
        if model.cfg != config:
            raise ValueError("model was built for a different config")
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size
        k = config.n_embed
        self.parent_ids = None if parent_ids is None else torch.as_tensor(parent_ids, dtype=torch.long).reshape(k)
        self.synonyms = None if synonyms is None else torch.as_tensor(synonyms, dtype=torch.long).reshape(k, -1)

    def to(self, device: str | torch.device) -> ViTVQGANTokenizer:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.quantizer.embedding.weight.device

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_enhancing_checkpoint(cls, path: str | Path, codebook: str | Path | torch.Tensor | None = None,
                                  synonyms: torch.Tensor | None = None) -> ViTVQGANTokenizer:
        """Load enhancing-transformers / SeiT ViT-VQGAN weights; ``codebook`` (SeiT's ``codebook.ckpt`` or a
        float (K', D) tensor) restricts the ids to those codes, in that order (SeiT's ids)."""
        sd = load_state(path)
        cfg = config_from_state_dict(sd)
        model = _build(cfg, sd, str(path))
        tok = cls(cfg, model)
        if codebook is None:
            return tok
        sub = codebook if isinstance(codebook, torch.Tensor) else read_codebook(str(codebook))
        if not isinstance(sub, torch.Tensor) or sub.ndim != 2 or sub.shape[1] != cfg.embed_dim:
            raise ValueError(f"codebook must be a float (K, {cfg.embed_dim}) tensor")
        return tok.restrict_to(sub.float(), synonyms)

    def restrict_to(self, codebook: torch.Tensor, synonyms: torch.Tensor | None = None) -> ViTVQGANTokenizer:
        """A copy whose codes are exactly ``codebook`` float (K', D) rows (ids 0..K'-1, SeiT's subset)."""
        full = self.model.quantizer.embedding.weight.detach().cpu()
        cfg = dataclasses.replace(self.config, n_embed=int(codebook.shape[0]))
        sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        sd["quantizer.embedding.weight"] = codebook.detach().cpu().float().clone()
        return ViTVQGANTokenizer(cfg, _build(cfg, sd, "restrict_to").to(self.device),
                                 parent_ids=_parent_ids(full, codebook), synonyms=synonyms,
                                 batch_size=self.batch_size)

    # ---- persistence --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def live_weights(self) -> dict[str, torch.Tensor]:
        """The network's weights where they are (no copies), plus the extra tensors ``state_dict`` stores."""
        sd = dict(self.model.state_dict())
        if self.parent_ids is not None:
            sd[_PARENT_KEY] = self.parent_ids
        if self.synonyms is not None:
            sd[_SYNONYM_KEY] = self.synonyms
        return sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        """enhancing-transformers-named weights (CPU), plus parent ids / synonyms when present."""
        return {k: v.detach().cpu() for k, v in self.live_weights().items()}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ViTVQGANTokenizer:
        names = {f.name for f in dataclasses.fields(ViTVQGANConfig)}
        if set(config) - names:
            raise ValueError(f"unknown ViTVQGANConfig keys {sorted(set(config) - names)}")
        cfg = ViTVQGANConfig(**config)
        sd = dict(state_dict)
        parent, syn = sd.pop(_PARENT_KEY, None), sd.pop(_SYNONYM_KEY, None)
        return cls(cfg, _build(cfg, sd, "state_dict"), parent_ids=parent, synonyms=syn)

    # ---- interface ----------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid_side, self.config.grid_side)

    @property
    def codebook(self) -> torch.Tensor:
        """float32 (K, D) CPU copy of ``quantizer.embedding.weight`` (SeiT's subset when restricted)."""
        return self.model.quantizer.embedding.weight.detach().to("cpu", torch.float32)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, R, R, 3) RGB -> int64 (N, R/p, R/p) ids: nearest code by cosine (ties: lowest id)."""
        images, g = self.check_images(images), self.config.grid_side
        out = np.empty((images.shape[0], g, g), dtype=np.int64)
        codes = F.normalize(self.model.quantizer.embedding.weight, dim=1)
        with torch.inference_mode():
            for s in range(0, images.shape[0], self.batch_size):
                x = torch.from_numpy(images[s : s + self.batch_size]).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0)  # ToTensor: [0, 1], no mean/std
                z = F.normalize(self.model.encode_latents(x), dim=-1)  # (B, L, D)
                out[s : s + self.batch_size] = (z @ codes.T).argmax(-1).view(-1, g, g).cpu().numpy()
        return out

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Integer (N, R/p, R/p) ids in [0, K) -> uint8 (N, R, R, 3) reconstructions."""
        ids, r = self.check_ids(ids), self.config.image_size
        out = np.empty((ids.shape[0], r, r, 3), dtype=np.uint8)
        cb = self.model.quantizer.embedding.weight
        with torch.inference_mode():
            for s in range(0, ids.shape[0], self.batch_size):
                t = torch.from_numpy(ids[s : s + self.batch_size].astype(np.int64)).to(self.device)
                x = self.model.decode_codes(cb[t.reshape(t.shape[0], -1)]).clamp_(0.0, 1.0)
                out[s : s + self.batch_size] = x.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out


def _build(cfg: ViTVQGANConfig, sd: Mapping[str, torch.Tensor], source: str) -> ViTVQ:
    """A ViTVQ for ``cfg`` holding ``sd``; every missing / unexpected key and shape mismatch listed in one error."""
    model = ViTVQ(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        def few(names: list[str]) -> str:
            return f"{len(names)} {names[:6]}" + (" ..." if len(names) > 6 else "")
        raise ValueError(f"{source}: does not fit ViTVQ {cfg}: missing {few(missing)}; unexpected "
                         f"{few(unexpected)}; shape mismatch {few(shapes)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model

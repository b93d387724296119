"""User encoders: k (prompt, preferred, rejected) triples -> one fixed-size user embedding.

Every encoder maps each triple to a vector ``g_i`` on its own (``encode_triples``); the user embedding
pools them with an order-free mean and a unit norm::

    e_u = normalize( (1/k) sum_i g(prompt_i, preferred_i, rejected_i) )

so the embedding does not depend on the order of the pairs (the mean is taken in float64).

Encoders (pluggable: anything with ``name``, ``dim`` and ``encode_triples``):

* ``CLIPPairEncoder`` (default): ``g = normalize(f(preferred)) - normalize(f(rejected))`` with ``f``
  the image features of a CLIP-family model the user has locally: a transformers ``CLIPModel`` folder
  (the toy world's CLIP is one) or an open_clip state-dict file with its model name.
* ``VLMEncoder`` (PPD's choice: a frozen vision-language model, LLaVA-OneVision in the paper): the
  triple is written as one prompt with both images (``template``), and ``g`` is a hidden state of the
  language model at ``layer``, the last token's (``pooling="last"``) or the mean over tokens
  (``"mean"``). Any ``AutoModelForImageTextToText`` folder with its processor loads.

``load_encoder("clip=PATH")``, ``load_encoder("open_clip=FILE@ViT-H-14")``, ``load_encoder("vlm=PATH")``
build one from a spec string (what profiles record as their ``encoder``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class EncoderError(ValueError):
    """A user encoder that cannot be built or applied; the message names the spec or input."""


class TripleEncoder(Protocol):
    name: str  # the spec it was built from (recorded in profiles)
    dim: int

    def encode_triples(self, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``[k]`` prompts and ``[k,3,H,W]`` images in [0,1] -> per-triple vectors ``[k, dim]``."""
        ...


def pool(g: torch.Tensor) -> torch.Tensor:
    """Per-triple vectors ``[k, D]`` -> the unit-norm user embedding ``[D]`` (mean: order-free)."""
    if g.ndim != 2 or g.shape[0] == 0:
        raise EncoderError(f"need at least one triple to embed a user, got vectors of shape {tuple(g.shape)}")
    m = g.double().mean(0)
    return F.normalize(m, dim=0).float()


def _check(prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor) -> None:
    if preferred.shape != rejected.shape or preferred.ndim != 4 or preferred.shape[1] != 3:
        raise EncoderError(f"preferred and rejected must both be [k,3,H,W]; got {tuple(preferred.shape)} "
                           f"and {tuple(rejected.shape)}")
    if len(prompts) != preferred.shape[0]:
        raise EncoderError(f"{len(prompts)} prompts for {preferred.shape[0]} image pairs")


@torch.no_grad()
def user_embedding(
    encoder: TripleEncoder, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """The user embedding ``[D]`` of k triples (any k >= 1; PPD uses 4)."""
    return pool(encode_in_batches(encoder, prompts, preferred, rejected, batch_size))


@torch.no_grad()
def encode_in_batches(
    encoder: TripleEncoder, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    _check(prompts, preferred, rejected)
    out = [encoder.encode_triples(prompts[i:i + batch_size], preferred[i:i + batch_size], rejected[i:i + batch_size])
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out).float().cpu() if out else torch.zeros(0, encoder.dim)


class CLIPPairEncoder:
    """``g = normalize(f(w)) - normalize(f(lose))`` with ``f`` a CLIP image tower (``rewards.clip_backbone``).

    ``features="pooled"`` (default): ``f`` is the image embedding (CLIP's projected pooled output).
    ``features="patches"``: ``f`` is the image tower's last hidden states of the patch tokens, average-pooled
    to a ``grid x grid`` map and flattened (``grid**2 * width`` values; IP-Adapter Plus's choice of patch
    features): they keep where things are and how large, which the pooled embedding mostly averages away.
    """

    def __init__(self, clip: Any, name: str = "clip", features: str = "pooled", grid: int = 4) -> None:
        if features not in ("pooled", "patches"):
            raise EncoderError(f"{name}: CLIP features must be 'pooled' or 'patches', got {features!r}")
        if grid < 1:
            raise EncoderError(f"{name}: patch grid must be >= 1, got {grid}")
        self.clip, self.name, self.features, self.grid = clip.eval().requires_grad_(False), name, features, grid
        with torch.no_grad():
            self.dim = int(self._features(torch.zeros(1, 3, clip.image_size, clip.image_size)).shape[-1])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        from rewards.preprocess import clip_preprocess

        dev = next(self.clip.parameters()).device
        pixels = clip_preprocess(images.float().to(dev), self.clip.image_size)
        if self.features == "patches":
            return F.normalize(self._patches(pixels).float().flatten(1), dim=-1)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def _patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the image tower's last layer, pooled to ``[B, grid, grid, width]``."""
        model = getattr(self.clip, "model", None)
        vision = getattr(model, "vision_model", None)
        if vision is not None:  # transformers CLIPModel: [B, 1 + n*n, width], the class token first
            tokens = vision(pixel_values=pixels.to(next(vision.parameters()).dtype)).last_hidden_state[:, 1:]
        elif hasattr(getattr(model, "visual", None), "output_tokens"):  # open_clip VisionTransformer
            visual = model.visual
            old, visual.output_tokens = visual.output_tokens, True
            try:
                tokens = visual(pixels.to(next(visual.parameters()).dtype))[1]
            finally:
                visual.output_tokens = old
        else:
            raise EncoderError(f"{self.name}: patch features need a ViT image tower (transformers CLIPModel or "
                               "open_clip VisionTransformer)")
        n = int(round(tokens.shape[1] ** 0.5))
        if n * n != tokens.shape[1]:
            raise EncoderError(f"{self.name}: {tokens.shape[1]} patch tokens do not form a square grid")
        grid = tokens.reshape(tokens.shape[0], n, n, -1).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(grid.float(), min(self.grid, n)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def encode_triples(self, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        _check(prompts, preferred, rejected)
        return self._features(preferred) - self._features(rejected)

    @classmethod
    def from_path(cls, path: str | Path, model_name: str | None = None, device: str | torch.device = "cpu",
                  features: str = "pooled", grid: int = 4) -> CLIPPairEncoder:
        """A transformers CLIPModel folder, or an open_clip state-dict file (``model_name`` its config)."""
        from rewards.clip_backbone import load_clip_backbone

        p = Path(path)
        if not p.exists():
            raise EncoderError(f"user encoder: {p} does not exist (a CLIPModel folder or an open_clip weights file)")
        try:
            clip = load_clip_backbone(p, model_name=model_name, reward="user encoder")
        except Exception as e:  # noqa: BLE001  (RewardLoadError and the libraries' own)
            raise EncoderError(f"user encoder: cannot load CLIP image features from {p}: {e}") from e
        kind = ("open_clip" if model_name else "clip") + ("_patches" if features == "patches" else "")
        spec = f"{kind}={p}@{model_name}" if model_name else f"{kind}={p}"
        if features == "patches" and grid != 4:
            spec += f"#{grid}"
        return cls(clip.to(device), name=spec, features=features, grid=grid)


DEFAULT_TEMPLATE = "Prompt: {prompt}\nPreferred: {image}\nRejected: {image}\n"


class VLMEncoder:
    """A frozen vision-language model: ``g`` = hidden state at ``layer`` of the triple written as one prompt."""

    def __init__(self, model: Any, processor: Any, layer: int = -1, pooling: str = "last",
                 template: str = DEFAULT_TEMPLATE, name: str = "vlm") -> None:
        if pooling not in ("last", "mean"):
            raise EncoderError(f"VLM pooling must be 'last' or 'mean', got {pooling!r}")
        if template.count("{image}") != 2 or "{prompt}" not in template:
            raise EncoderError("VLM template needs '{prompt}' and two '{image}' slots (preferred, then rejected)")
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.layer, self.pooling, self.template, self.name = layer, pooling, template, name
        image_token = getattr(processor, "image_token", None)
        if not image_token:
            raise EncoderError(f"{name}: the processor has no image_token; is this a vision-language model?")
        self.image_token = image_token
        text_cfg = getattr(model.config, "text_config", model.config)
        self.dim = int(text_cfg.hidden_size)

    @torch.no_grad()
    def encode_triples(self, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        _check(prompts, preferred, rejected)

        def pil(x: torch.Tensor) -> Image.Image:
            arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            return Image.fromarray(arr)

        dev = next(self.model.parameters()).device
        out = []
        for p, w, lose in zip(prompts, preferred, rejected, strict=True):  # one triple per call: no padding effects
            text = self.template.format(prompt=p, image=self.image_token)
            inputs = self.processor(text=[text], images=[[pil(w), pil(lose)]], return_tensors="pt").to(dev)
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states
            try:
                h = hidden[self.layer][0].float()  # [T, d]
            except IndexError:
                raise EncoderError(f"{self.name}: layer {self.layer} out of range ({len(hidden)} hidden states)") from None
            out.append(h[-1] if self.pooling == "last" else h.mean(0))
        return torch.stack(out)

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: int = -1, pooling: str = "last",
                        device: str | torch.device = "cpu", **kw: Any) -> VLMEncoder:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = Path(path)
        if not (p / "config.json").is_file():
            raise EncoderError(f"user encoder: {p} has no config.json (a local vision-language model folder)")
        try:
            processor = AutoProcessor.from_pretrained(str(p), local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(str(p), local_files_only=True).to(device)
        except Exception as e:  # noqa: BLE001
            raise EncoderError(f"user encoder: cannot load a vision-language model from {p}: {e}") from e
        return cls(model, processor, layer=layer, pooling=pooling, name=f"vlm={p}", **kw)


def load_encoder(spec: str, device: str | torch.device = "cpu") -> TripleEncoder:
    """``clip=FOLDER`` | ``open_clip=FILE@MODEL_NAME`` | ``vlm=FOLDER`` (a bare path means ``clip=``).

    ``clip_patches=FOLDER`` and ``open_clip_patches=FILE@MODEL_NAME`` use the patch features
    (``CLIPPairEncoder``, ``features="patches"``) on a 4 x 4 grid; ``#N`` at the end sets an N x N grid."""
    kind, sep, rest = spec.partition("=")
    if not sep:
        kind, rest = "clip", spec
    features, grid = "pooled", 4
    if kind in ("clip_patches", "open_clip_patches"):
        kind, features = kind.removesuffix("_patches"), "patches"
        rest, hash_, g = rest.rpartition("#") if "#" in rest else (rest, "", "")
        if hash_:
            if not g.isdigit() or int(g) < 1:
                raise EncoderError(f"user encoder {spec!r}: the patch grid after '#' must be a positive integer")
            grid = int(g)
    if kind == "clip":
        return CLIPPairEncoder.from_path(rest, device=device, features=features, grid=grid)
    if kind == "open_clip":
        path, at, name = rest.rpartition("@")
        if not at:
            raise EncoderError(f"user encoder {spec!r}: open_clip needs FILE@MODEL_NAME, e.g. open_clip=w.bin@ViT-H-14")
        return CLIPPairEncoder.from_path(path, model_name=name, device=device, features=features, grid=grid)
    if kind == "vlm":
        return VLMEncoder.from_pretrained(rest, device=device)
    raise EncoderError(f"user encoder {spec!r}: unknown kind {kind!r} (clip, clip_patches, open_clip, "
                       "open_clip_patches or vlm)")


# ------------------------------------------------------------------ reference-image encoders (ID-Aligner)


class ReferenceImageEncoder:
    """Reference images ``[K,3,H,W]`` in [0,1] -> one unit-norm embedding ``[dim]`` (the mean of the K image
    embeddings): what an identity adapter (ID-Aligner's IP-Adapter form) feeds its decoupled cross-attention,
    in the place of personalization's user embedding. ``embed`` maps ``[N,3,H,W]`` to ``[N,dim]``."""

    def __init__(self, embed: Any, dim: int, name: str) -> None:
        self.embed, self.dim, self.name = embed, dim, name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(-1, *images.shape[-3:]).float()
        return pool(F.normalize(self.embed(x).float(), dim=-1))


def load_image_encoder(spec: str, device: str | torch.device = "cpu") -> ReferenceImageEncoder:
    """``toy_identity`` / ``toy_identity=FOLDER`` (the toy identity network; default: the shipped one),
    ``arcface=FILE`` (an insightface arcface_torch iresnet ``backbone.pth``; the references must be aligned
    112x112 face crops), ``clip=FOLDER`` (a transformers CLIPModel's image features, IP-Adapter's choice)."""
    kind, sep, rest = spec.partition("=")
    try:
        if kind == "toy_identity":
            from ..toyworld.identity import load_identity_net

            net = load_identity_net(rest or None, device=device)
            return ReferenceImageEncoder(lambda x: net(x.to(device)), net.dim, spec)
        if kind == "arcface" and sep:
            from rewards.identity import load_iresnet

            arc = load_iresnet(rest).to(device).eval().requires_grad_(False)

            def embed(x: torch.Tensor) -> torch.Tensor:
                x = F.interpolate(x.to(device), size=(112, 112), mode="bilinear", align_corners=False)
                return arc((x - 0.5) / 0.5)

            return ReferenceImageEncoder(embed, int(arc.fc.out_features), spec)
        if kind == "clip" and sep:
            clip = CLIPPairEncoder.from_path(rest, device=device)
            return ReferenceImageEncoder(clip._features, clip.dim, spec)
    except (FileNotFoundError, ValueError) as e:
        raise EncoderError(f"reference image encoder {spec!r}: {e}") from e
    raise EncoderError(f"reference image encoder {spec!r}: expected toy_identity[=FOLDER], arcface=FILE or clip=FOLDER")

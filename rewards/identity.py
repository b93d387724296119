"""Face identity reward (ID-Aligner style): cosine similarity between the ArcFace embedding of the face in
each generated image and that of a reference face.

Pipeline per image:
  1. a pluggable detector returns five landmarks (eyes, nose, mouth corners) -- under ``no_grad``;
  2. a similarity transform to the ArcFace 112x112 template is fitted to them (Umeyama, as skimage's
     ``SimilarityTransform`` in insightface's ``estimate_norm``);
  3. the face is cropped with ``affine_grid`` + ``grid_sample`` (cv2.warpAffine's pixel convention), which
     is differentiable, so gradients reach the pixels;
  4. an iresnet (insightface ``arcface_torch`` layout, e.g. ``backbone.pth`` of ms1mv3_arcface_r100) embeds
     ``(x - 0.5) / 0.5`` RGB; the score is ``cos(E_gen, E_ref)``.

Images where the detector finds no face are masked out: their score is ``NaN`` (or ``no_face_value`` if
set), never a number from a fake embedding, and they are counted in ``faces_missing``. Use
``masked_mean(scores)`` (or ``scores[reward.last_face_mask]``) to build a loss.

insightface's pretrained models are licensed for non-commercial research only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    FrozenReward,
    RewardLoadError,
    load_state_dict_strict,
    load_weights,
    unwrap_state_dict,
)
from .base import RewardInputError, check_images
from .registry import register

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_SIZE = 112

# ---------------------------------------------------------------- iresnet (insightface arcface_torch)

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6)}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """arcface_torch's ``IResNet``; ``widths`` other than (64,128,256,512) exist only for tiny test models."""

    def __init__(self, layers: Sequence[int] = IRESNET_LAYERS["r100"], num_features: int = 512,
                 widths: Sequence[int] = (64, 128, 256, 512), input_size: int = ARCFACE_SIZE) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        side = input_size // 16
        self.fc = nn.Linear(widths[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def load_iresnet(path: str | os.PathLike, arch: str | None = None, **kwargs: Any) -> IResNet:
    """Load an arcface_torch ``backbone.pth``; the depth is read from the keys when ``arch`` is None."""
    sd = unwrap_state_dict(load_weights(path, reward="identity"))
    if "conv1.weight" not in sd or "fc.weight" not in sd or "features.running_mean" not in sd:
        raise RewardLoadError(
            f"identity: {str(path)!r} is not an insightface arcface_torch iresnet state dict (expected conv1.*, "
            f"layer1..4.*, fc.*, features.*; first keys: {', '.join(list(sd)[:4])}). ONNX models (buffalo_l, "
            "antelopev2) must be converted first."
        )
    if arch is None:
        counts = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        arch = next((a for a, n in IRESNET_LAYERS.items() if n == counts), None)
        if arch is None and not kwargs.get("layers"):
            raise RewardLoadError(f"identity: {str(path)!r} has blocks per stage {counts}, not a known iresnet")
    layers = kwargs.pop("layers", None) or IRESNET_LAYERS[arch]  # type: ignore[index]
    widths = kwargs.pop("widths", None) or (int(sd["conv1.weight"].shape[0]),) + tuple(
        int(sd[f"layer{i}.0.conv1.weight"].shape[0]) for i in (2, 3, 4))
    net = IResNet(layers, num_features=int(sd["fc.weight"].shape[0]), widths=widths, **kwargs)
    load_state_dict_strict(net, sd, reward="identity", path=path)
    return net


# ---------------------------------------------------------------- alignment


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping ``src`` to ``dst``
    (both ``[N,2]``), as a 2x3 matrix. Umeyama 1991, as ``skimage.transform.SimilarityTransform.estimate``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    a = dc.T @ sc / src.shape[0]
    d = np.ones(2)
    if np.linalg.det(a) < 0:
        d[1] = -1
    u, s, vt = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("umeyama: degenerate landmarks (all at one point)")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        r = u @ vt
    elif rank == 1:
        r = u @ np.diag([d[0], -1.0]) @ vt
    else:
        r = u @ np.diag(d) @ vt
    scale = (s @ d) / sc.var(axis=0).sum()
    t = mu_d - scale * r @ mu_s
    return np.concatenate([scale * r, t[:, None]], axis=1)


def align_faces(
    images: torch.Tensor, landmarks: torch.Tensor | np.ndarray, size: int = ARCFACE_SIZE,
    template: np.ndarray = ARCFACE_TEMPLATE,
) -> torch.Tensor:
    """Differentiable ArcFace crop: ``[N,3,H,W]`` images and ``[N,5,2]`` landmarks (pixel coordinates, pixel
    centres at integers as in cv2) -> ``[N,3,size,size]``, equal to ``cv2.warpAffine(img, M, (size,size))``
    with bilinear sampling and zero border, where ``M = umeyama(landmarks, template * size/112)``."""
    n, _, h, w = images.shape
    lms = landmarks.detach().cpu().double().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(landmarks)
    tmpl = template * (size / ARCFACE_SIZE)
    # normalized(dst) -> pixel(dst) -> pixel(src) -> normalized(src), for align_corners=False
    to_pix = np.array([[size / 2.0, 0, size / 2.0 - 0.5], [0, size / 2.0, size / 2.0 - 0.5], [0, 0, 1]])
    to_norm = np.array([[2.0 / w, 0, 1.0 / w - 1], [0, 2.0 / h, 1.0 / h - 1], [0, 0, 1]])
    thetas = []
    for i in range(n):
        m = np.vstack([umeyama(lms[i], tmpl), [0, 0, 1]])
        thetas.append((to_norm @ np.linalg.inv(m) @ to_pix)[:2])
    theta = torch.tensor(np.stack(thetas), dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------- detectors


class FaceDetector(Protocol):
    """Returns, per image, the 5 landmarks ``[5,2]`` (x, y in pixels) of the face to score, or None."""

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor | None]: ...


class AlignedFaceDetector:
    """For images that are already ArcFace-aligned crops (any size): the landmarks are the template scaled
    to the image. Use for reference faces given as aligned crops, and in tests."""

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor | None]:
        h, w = images.shape[-2:]
        lm = torch.tensor(ARCFACE_TEMPLATE * np.array([w / ARCFACE_SIZE, h / ARCFACE_SIZE]), dtype=torch.float64)
        return [lm.clone() for _ in range(images.shape[0])]


class CallableDetector:
    """Wraps any detector that takes one ``uint8`` ``HxWx3`` numpy image and returns a list of faces, each a
    dict or object with ``kps`` ([5,2]) and optionally ``bbox`` ([x1,y1,x2,y2]); the largest face is used.
    ``bgr=True`` passes BGR (insightface's ``FaceAnalysis.get`` expects cv2 BGR images), e.g.
    ``CallableDetector(app.get, bgr=True)``."""

    def __init__(self, fn: Callable[[np.ndarray], Sequence[Any]], bgr: bool = False) -> None:
        self.fn = fn
        self.bgr = bgr

    @staticmethod
    def _get(face: Any, key: str) -> Any:
        return face.get(key) if isinstance(face, dict) else getattr(face, key, None)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for img in arr:
            faces = list(self.fn(img[..., ::-1].copy() if self.bgr else img) or [])
            faces = [f for f in faces if self._get(f, "kps") is not None]
            if not faces:
                out.append(None)
                continue

            def area(f: Any) -> float:
                b = self._get(f, "bbox")
                return float((b[2] - b[0]) * (b[3] - b[1])) if b is not None else 0.0

            best = max(faces, key=area)
            out.append(torch.as_tensor(np.asarray(self._get(best, "kps"), dtype=np.float64)).reshape(5, 2))
        return out


# ---------------------------------------------------------------- reward


def masked_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean over the images where a face was found (NaN entries are masked-out images)."""
    keep = ~torch.isnan(scores)
    if not bool(keep.any()):
        raise RewardInputError("identity: no face found in any image of the batch")
    return scores[keep].mean()


class IdentityReward(FrozenReward):
    name = "identity"

    def __init__(self, embedder: IResNet, detector: FaceDetector | None = None,
                 reference_detector: FaceDetector | None = None, no_face_value: float | None = None) -> None:
        super().__init__()
        self.embedder = embedder
        self.detector = detector
        self.reference_detector = reference_detector
        self.no_face_value = no_face_value
        self.images_seen = 0
        self.faces_missing = 0
        self.last_face_mask: torch.Tensor | None = None
        self.freeze()

    def embed_faces(self, faces: torch.Tensor) -> torch.Tensor:
        """``[N,3,112,112]`` aligned RGB crops in [0,1] -> L2-normalised ``[N,D]`` embeddings."""
        x = (faces - 0.5) / 0.5
        return F.normalize(self.embedder(x.to(self.embedder.conv1.weight.dtype)).float(), dim=-1)

    def _detect(self, detector: FaceDetector | None, images: torch.Tensor, what: str) -> list[torch.Tensor | None]:
        if detector is None:
            raise RewardInputError(
                f"identity: no face detector configured for the {what}: pass detector= (a callable returning 5 "
                "landmarks per image, e.g. CallableDetector(insightface_app.get, bgr=True)) or "
                "AlignedFaceDetector() if the images are already aligned face crops"
            )
        with torch.no_grad():
            found = detector(images)
        if len(found) != images.shape[0]:
            raise RuntimeError(f"identity: detector returned {len(found)} results for {images.shape[0]} images")
        return found

    def reference_embeddings(self, context: dict[str, Any] | None, batch: int, device: torch.device) -> torch.Tensor:
        ctx = context or {}
        if "reference_embeddings" in ctx:
            ref = torch.as_tensor(ctx["reference_embeddings"], device=device, dtype=torch.float32)
            ref = F.normalize(ref.reshape(-1, ref.shape[-1]), dim=-1)
        elif "reference_faces" in ctx:
            faces = torch.as_tensor(ctx["reference_faces"], device=device)
            if faces.ndim == 3:
                faces = faces[None]
            per_row = faces.shape[1] if faces.ndim == 5 else 1  # [N,K,3,H,W]: K references per row, averaged
            faces = faces.flatten(0, 1) if faces.ndim == 5 else faces

            check_images(faces, name="identity reference_faces")
            lms = self._detect(self.reference_detector or self.detector, faces, "reference faces")
            if any(lm is None for lm in lms):
                bad = [i for i, lm in enumerate(lms) if lm is None]
                raise RewardInputError(f"identity: no face found in reference image(s) {bad}")
            with torch.no_grad():
                ref = self.embed_faces(align_faces(faces.float(), torch.stack(lms)))  # type: ignore[arg-type]
                if per_row > 1:
                    ref = F.normalize(ref.reshape(-1, per_row, ref.shape[-1]).mean(1), dim=-1)
        else:
            raise RewardInputError("identity: context needs 'reference_faces' ([1 or B,(K,)3,H,W] in [0,1]) or "
                                   "'reference_embeddings' ([1 or B,D])")
        if ref.shape[0] not in (1, batch):
            raise RewardInputError(f"identity: {ref.shape[0]} references for {batch} images (need 1 or {batch})")
        return ref.expand(batch, -1)

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        b = images.shape[0]
        ref = self.reference_embeddings(context, b, images.device)
        lms = self._detect(self.detector, images, "generated images")
        idx = [i for i, lm in enumerate(lms) if lm is not None]
        mask = torch.zeros(b, dtype=torch.bool, device=images.device)
        mask[idx] = True
        self.last_face_mask = mask
        self.images_seen += b
        self.faces_missing += b - len(idx)
        fill = float("nan") if self.no_face_value is None else float(self.no_face_value)
        out = torch.full((b,), fill, dtype=torch.float32, device=images.device)
        if idx:
            sel = torch.tensor(idx, device=images.device)
            crops = align_faces(images[sel].float(), torch.stack([lms[i] for i in idx]))  # type: ignore[misc]
            cos = (self.embed_faces(crops) * ref[sel]).sum(-1)
            out = out.index_put((sel,), cos)
        return out

    @property
    def face_rate(self) -> float:
        """Fraction of scored images in which a face was found."""
        return 1.0 - self.faces_missing / self.images_seen if self.images_seen else float("nan")


@register("identity")
def load_identity(
    path: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    detector: FaceDetector | None = None,
    reference_detector: FaceDetector | None = None,
    no_face_value: float | None = None,
) -> IdentityReward:
    """``path``: an insightface arcface_torch ``backbone.pth`` (iresnet; depth auto-detected or ``arch``).
    ``detector``: see :class:`FaceDetector`. insightface models: non-commercial research only."""
    if path is None:
        raise RewardLoadError("identity: no path given for the ArcFace iresnet backbone.pth")
    return IdentityReward(load_iresnet(path, arch), detector, reference_detector, no_face_value)

"""Face identity reward: Umeyama alignment, differentiable ArcFace crop vs a cv2.warpAffine reference,
iresnet checkpoint loading, and the no-face mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rewards
from rewards import RewardInputError, RewardLoadError
from rewards.identity import (
    ARCFACE_TEMPLATE,
    AlignedFaceDetector,
    CallableDetector,
    align_faces,
    load_iresnet,
    masked_mean,
    umeyama,
)
from rewards.testing import make_test_images, pil_to_tensor, tiny_iresnet


def _similarity(scale, angle, t):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, t[0]], [scale * s, scale * c, t[1]]])


def test_umeyama_recovers_a_similarity():
    m = _similarity(1.7, 0.3, (5.0, -3.0))
    src = ARCFACE_TEMPLATE
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(umeyama(src, dst), m, atol=1e-9)


def _warp_affine_reference(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine(img, m, (size,size), INTER_LINEAR, BORDER_CONSTANT=0) written out in numpy."""
    c, h, w = img.shape
    minv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    out = np.zeros((c, size, size))
    for y in range(size):
        for x in range(size):
            sx, sy = minv @ np.array([x, y, 1.0])
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            ax, ay = sx - x0, sy - y0
            for dy, wy in ((0, 1 - ay), (1, ay)):
                for dx, wx in ((0, 1 - ax), (1, ax)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, y, x] += wy * wx * img[:, yy, xx]
    return out


def test_align_faces_matches_warp_affine_and_is_differentiable():
    torch.manual_seed(0)
    img = torch.rand(1, 3, 70, 90, dtype=torch.float64)
    m_true = _similarity(0.6, -0.2, (20.0, 8.0))  # template -> image
    lms = ARCFACE_TEMPLATE @ m_true[:, :2].T + m_true[:, 2]
    m = umeyama(lms, ARCFACE_TEMPLATE * (40 / 112))
    crop = align_faces(img, torch.tensor(lms)[None], size=40)
    ref = _warp_affine_reference(img[0].numpy(), m, 40)
    np.testing.assert_allclose(crop[0].numpy(), ref, atol=1e-9)
    x = img.clone().float().requires_grad_(True)
    align_faces(x, torch.tensor(lms)[None]).sum().backward()
    assert x.grad.abs().sum() > 0


def test_iresnet_checkpoint_roundtrip(tmp_path):
    net = tiny_iresnet()
    f = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), f)
    with pytest.raises(RewardLoadError, match=r"blocks per stage \(1, 1, 1, 1\)"):
        load_iresnet(f)
    loaded = load_iresnet(f, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
    bad = tmp_path / "w600k_r50.onnx.pth"
    torch.save({"backbone.weight": torch.zeros(1)}, bad)
    with pytest.raises(RewardLoadError, match="not an insightface arcface_torch iresnet"):
        rewards.load("identity", path=str(bad))


class _BlackMeansNoFace:
    """Test detector: a face at the ArcFace template position, unless the image is black."""

    def __call__(self, images):
        aligned = AlignedFaceDetector()(images)
        return [lm if float(im.mean()) > 0.01 else None for lm, im in zip(aligned, images, strict=True)]


def _faces():
    return torch.stack([pil_to_tensor(i) for i in make_test_images(2, sizes=((112, 112),), seed=5)])


def test_identity_reward_scores_masks_and_counts(tmp_path):
    net = tiny_iresnet(seed=1)
    f = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), f)
    r = rewards.identity.IdentityReward(load_iresnet(f, layers=(1, 1, 1, 1)), detector=_BlackMeansNoFace(),
                                        reference_detector=AlignedFaceDetector())
    faces = _faces()
    batch = torch.stack([faces[0], faces[1], torch.zeros(3, 112, 112)])
    ctx = {"reference_faces": faces[0:1]}
    x = batch.clone().requires_grad_(True)
    s = r(x, None, ctx)
    assert abs(float(s[0].detach()) - 1.0) < 1e-5  # the reference itself
    assert float(s[1].detach()) < 0.999 and torch.isnan(s[2])
    assert r.last_face_mask.tolist() == [True, True, False]
    assert (r.images_seen, r.faces_missing) == (3, 1) and abs(r.face_rate - 2 / 3) < 1e-9
    masked_mean(s).backward()
    assert x.grad[1].abs().sum() > 0 and torch.isfinite(x.grad).all() and x.grad[2].abs().sum() == 0
    emb = r.embed_faces(faces[0:1])
    with torch.no_grad():
        torch.testing.assert_close(r(batch[:2], None, {"reference_embeddings": emb}), s[:2].detach())
    penalised = rewards.identity.IdentityReward(r.embedder, detector=_BlackMeansNoFace(), no_face_value=-1.0)
    with torch.no_grad():
        assert float(penalised(batch, None, {"reference_embeddings": emb})[2]) == -1.0
    with pytest.raises(RewardInputError, match="no face found in any image"):
        masked_mean(torch.full((2,), float("nan")))


def test_identity_errors(tmp_path):
    net = tiny_iresnet()
    f = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), f)
    r = rewards.identity.IdentityReward(load_iresnet(f, layers=(1, 1, 1, 1)))
    faces = _faces()
    with pytest.raises(RewardInputError, match="no face detector configured"):
        r(faces, None, {"reference_faces": faces[:1]})
    r.detector = AlignedFaceDetector()
    with pytest.raises(RewardInputError, match="reference_faces"):
        r(faces, None, None)
    with pytest.raises(RewardInputError, match="3 references for 2 images"):
        r(faces, None, {"reference_embeddings": torch.randn(3, 32)})
    r.reference_detector = _BlackMeansNoFace()
    with pytest.raises(RewardInputError, match=r"no face found in reference image\(s\) \[0\]"):
        r(faces, None, {"reference_faces": torch.zeros(1, 3, 112, 112)})


def test_callable_detector_picks_largest_face():
    kps_small, kps_big = np.ones((5, 2)), np.full((5, 2), 7.0)
    seen = {}

    def fake_app_get(img):
        seen["shape"], seen["first"] = img.shape, img[0, 0].tolist()
        return [{"bbox": [0, 0, 5, 5], "kps": kps_small}, {"bbox": [0, 0, 50, 40], "kps": kps_big}]

    det = CallableDetector(fake_app_get, bgr=True)
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0] = 1.0  # red
    out = det(img)
    assert seen["shape"] == (8, 8, 3) and seen["first"] == [0, 0, 255]  # BGR
    np.testing.assert_array_equal(out[0].numpy(), kps_big)
    assert CallableDetector(lambda im: [])(img) == [None]


def test_identity_reward_averages_k_references_per_row(tmp_path):
    import torch.nn.functional as F

    net = tiny_iresnet(seed=2)
    f = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), f)
    r = rewards.identity.IdentityReward(load_iresnet(f, layers=(1, 1, 1, 1)), detector=AlignedFaceDetector())
    faces = _faces()
    with torch.no_grad():
        got = r(faces, None, {"reference_faces": faces[None]})  # [1,K,3,H,W]: K=2 references for every image
        want_ref = F.normalize(r.embed_faces(faces).mean(0, keepdim=True), dim=-1)
        torch.testing.assert_close(got, r(faces, None, {"reference_embeddings": want_ref}))
        per_row = r(faces, None, {"reference_faces": faces[None].expand(2, -1, -1, -1, -1)})  # [B,K,...]
        torch.testing.assert_close(per_row, got)

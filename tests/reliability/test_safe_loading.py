"""Safe loading: weights through safetensors or torch.load(weights_only=True); no code shipped with a
model or planted in a checkpoint runs unless the user asks for it."""

from __future__ import annotations

import ast
import json
import pathlib
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.training import checkpoints as ckpt
from diffalign.training import train

REPO = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("diffalign", "rewards", "scripts") for p in (REPO / d).rglob("*.py")]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_unsafe_loading_calls_in_the_sources():
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
                bad.append(f"{where}: {owner}.{name}")
            v = kw.get("trust_remote_code")
            if isinstance(v, ast.Constant) and v.value is True:
                bad.append(f"{where}: trust_remote_code=True")
    assert not bad, "\n".join(bad)
    assert len(SOURCES) > 50  # the scan saw the code base


class _Planted:
    """Unpickling this runs code (it touches a file): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _plant(run: Path, rel: str, marker: Path) -> Path:
    """Replace a checkpoint file by a code-running pickle and fix the manifest, as an attacker would."""
    c = ckpt.list_checkpoints(run)[-1]
    torch.save({"objective": _Planted(marker), "ema": _Planted(marker)}, c / rel)
    meta = json.loads((c / ckpt.META).read_text())
    meta["files"] = ckpt.manifest(c)
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (c / ckpt.META).write_text(json.dumps(meta))
    ckpt.verify_checkpoint(c)  # the planted file passes verification: only safe unpickling stands in the way
    return c


@pytest.mark.parametrize("rel", ["state/diffalign_state_0.pt", "state/random_states_0.pkl", "state/optimizer.bin"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(rel, tmp_path, h):
    cfg = h.write_config(tmp_path, steps=2, checkpoint_every=1, keep_checkpoints=1, ema=True)
    train(load_config(cfg, ["--train.steps", "1"]))
    marker = tmp_path / "PWNED"
    c = _plant(tmp_path / "run", rel, marker)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint could be loaded") as e:
        train(load_config(cfg), resume="latest")
    assert str(c) in str(e.value) and ("Weights only load failed" in str(e.value) or "unreadable" in str(e.value))
    assert not marker.exists()


def test_ema_and_objective_state_round_trip_weights_only(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=2, checkpoint_every=1, ema=True)
    train(load_config(cfg))
    payload = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / "state" / "diffalign_state_0.pt",
                         weights_only=True)
    assert payload["ema"]["optimization_step"] == 2 and payload["ema"]["shadow_params"]


def test_model_folder_with_custom_code_is_refused_unless_trusted(tmp_path):
    from diffalign.backbones import load_backbone
    from diffalign.backbones.tiny import save_tiny

    model = save_tiny("sd15", tmp_path / "m")
    marker = tmp_path / "PWNED"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom diffusers import UNet2DConditionModel as EvilUNet\n"
    (model / "evil_unet.py").write_text(code)
    (model / "unet" / "evil_unet.py").write_text(code)
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = ["evil_unet", "EvilUNet"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"component 'unet' is 'EvilUNet' from 'evil_unet'.*trust_remote_code=True"):
        load_backbone(model)
    assert not marker.exists()


def test_stock_pipeline_components_pass_the_custom_code_check(tmp_path):
    from diffalign.backbones.loading import _refuse_custom_code

    _refuse_custom_code(tmp_path, {  # the original SD1.5 model_index.json
        "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None],
    })


def test_reward_checkpoint_with_code_is_refused(tmp_path):
    from rewards._common import RewardLoadError, load_weights

    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _Planted(marker)}, tmp_path / "head.pth")
    with pytest.raises(RewardLoadError, match="head.pth"):
        load_weights(tmp_path / "head.pth", reward="aesthetic")
    assert not marker.exists()

"""What the personalization sub-commands do (``diffalign profile create``, ``sample --profile``, ``choose``);
argument parsing stays in ``diffalign/cli.py``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def profile_create(pairs: str | Path, user: str, out: str | Path, encoder: str, min_pairs: int = 4,
                   resolution: int = 224, overwrite: bool = False) -> Path:
    """Embed ``user``'s decided pairs of ``pairs`` (Pick-a-Pic + user_id) into a profile file at ``out``."""
    from ..data.users import user_choices
    from .encoder import load_encoder
    from .profiles import create_profile

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose a new file name (or --overwrite)")
    prompts, w, lose = user_choices(pairs, user, resolution, min_pairs=min_pairs)
    enc = load_encoder(encoder)
    prof = create_profile(enc, prompts, w, lose, user_id=user, source=str(pairs), min_pairs=min_pairs)
    return prof.save(out, overwrite=overwrite)


def load_personalized(model: Any, injection: str | Path, profile: str, lora: str | Path | None = None,
                      scale: float | None = None, device: str | None = None) -> tuple[Any, Any]:
    """A backbone with the trained injection loaded and the profile (spec ``a.profile[:w],...``) mixed:
    ``(backbone, Profile)``. Sample inside ``personalized(backbone, profile.embedding)``."""
    from .inject import injection_config, load_injection
    from .profiles import ProfileError, mix_profiles

    prof = mix_profiles(profile)
    bb = load_model(model, lora, device=device)
    load_injection(bb, injection, scale=scale)
    cfg = injection_config(bb)
    if cfg.embed_dim != prof.dim:
        raise ProfileError(f"profile {profile!r} has {prof.dim} dimensions; the injection {injection} expects "
                           f"{cfg.embed_dim} (make the profile with the encoder the model was trained with)")
    return bb, prof


def choose(out: str | Path, user: str, model: str, prompts: list[str], host: str = "127.0.0.1", port: int = 7860,
           encoder: str | None = None, min_pairs: int = 4, steps: int = 30, guidance_scale: float = 7.5,
           lora: str | None = None, device: str | None = None, resolution: int = 224,
           serve_seconds: float | None = None) -> int:
    """Serve the choice page until Ctrl-C (or ``serve_seconds``)."""
    from .choose import ChoiceStore, backbone_pair_maker, profile_maker, serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this address can record choices")
    bb = load_model(model, lora, device=device)
    store = ChoiceStore(out, user, prompts, backbone_pair_maker(bb, steps, guidance_scale), min_pairs=min_pairs)
    server = serve(store, host, port, profile_maker(encoder, resolution) if encoder else None)
    print(f"choices of {user!r} go to {store.pairs_path}; open http://{host}:{server.server_address[1]}/ "
          "(Ctrl-C stops; nothing is lost)", flush=True)
    t0 = time.time()
    try:
        while serve_seconds is None or time.time() - t0 < serve_seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    print(f"{store.decided()} decided choices in {store.pairs_path}")
    return 0


def load_model(model: Any, lora: str | Path | None = None, device: str | None = None) -> Any:
    """A backbone from a diffusers folder (or the given one) with an optional LoRA, on ``device``."""
    from ..backbones import load_backbone
    from ..backbones.lora import load_lora

    bb = model if hasattr(model, "denoiser") else load_backbone(model)
    if lora:
        load_lora(bb, lora)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(dev) != bb.device:
        bb.to(dev)
    return bb


def embedding_rows(embedding: torch.Tensor, n: int) -> torch.Tensor:
    return embedding.reshape(1, -1).expand(n, -1)

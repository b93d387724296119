"""Decoupled cross-attention for user tokens (IP-Adapter style), for every backbone family.

A user embedding ``e`` ``[B, D]`` becomes ``n`` user tokens, and every text-attention layer gets its own
key/value projections for them; the user attention is added to the text attention before the layer's
output projection (PPD, Dang et al. 2025; IP-Adapter, Ye et al. 2023)::

    u  = LayerNorm(reshape(W_p e + b_p, [n, d]))                         user tokens   [B, n, d]
    Z' = softmax(Q K^T / sqrt(h)) V  +  scale * softmax(Q (u W'_k)^T / sqrt(h)) (u W'_v)
    out = to_out(Z') = to_out(Z) + scale * (to_out(U) - to_out(0))        to_out is affine: the same sum

``Q`` are the layer's own queries of the image tokens. Layers: every cross-attention ``attn2`` of the
UNets (SD1.5/2.x/SDXL), the joint attention of every SD3 block, and the double- and single-stream blocks
of FLUX. A single-stream block attends over the text and image tokens together with one set of
projections and has no output map of its own (its ``proj_out`` takes the attention output concatenated
with the MLP branch), so there every token's query gets the user term, added to the attention output as
it is (``Z' = Z + scale * softmax(Q (u W'_k)^T / sqrt(h)) (u W'_v)``; its keys are normalised by the
layer's ``norm_k``); ``proj_out`` is linear, so this is the same decoupled sum.
``W'_v`` starts at zero, so a freshly installed injection is the base model exactly, and with
``scale == 0`` (or no user embedding in the conditioning) the original attention processor runs alone:
the output is the unconditioned model's, bit for bit. Only ``W_p``, ``W'_k``, ``W'_v`` (and the
LayerNorm) are new; they are the only weights that train unless a LoRA is added as well.

The user embedding travels in the conditioning: ``Cond.tensors["user_embedding"]`` ``[B, D]``. The
backbone passes it to the denoiser as ``cross_attention_kwargs`` (UNets) / ``joint_attention_kwargs``
(flows); a forward pre-hook on the denoiser projects it to tokens once per call and hands them to the
processors as ``ip_hidden_states`` (the name diffusers' attention modules pass through quietly).

Saved as one small safetensors file (``save_injection``) with its settings in the header metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

USER_KEY = "user_embedding"  # the Cond tensor (and attention kwarg) holding user embeddings [B, D]
TOKENS_KEY = "ip_hidden_states"  # what the processors receive: projected user tokens [B, n, d]
FORMAT = "diffalign.user_injection"


class InjectionError(ValueError):
    """An injection that does not fit the model (or a file that is not an injection)."""


@dataclass
class InjectionConfig:
    embed_dim: int  # D: the user embedding size (the user encoder's)
    tokens: int = 4  # n: user tokens per embedding
    scale: float = 1.0
    family: str = ""
    token_dim: int = 0  # d: filled in from the model at install time
    layers: list[str] = field(default_factory=list)  # attention modules that got a user branch


def _unwrap(model: nn.Module) -> nn.Module:
    from .modules import unwrap

    return unwrap(model)


class UserProjection(nn.Module):
    """``e [B, D] -> u [B, n, d]``: one linear map then a LayerNorm per token (IP-Adapter's ImageProjModel)."""

    def __init__(self, embed_dim: int, tokens: int, token_dim: int) -> None:
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.proj = nn.Linear(embed_dim, tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(e).reshape(e.shape[0], self.tokens, self.token_dim))


def _kind(module: nn.Module, name: str, family: str) -> str | None:
    """Which layers get a user branch: 'cross' (UNet attn2), 'joint' (SD3 blocks), 'flux' (FLUX double blocks),
    'flux_single' (FLUX single-stream blocks)."""
    if family in ("sd", "sdxl"):
        return "cross" if name.endswith("attn2") and getattr(module, "is_cross_attention", False) else None
    if family == "sd3":
        return "joint" if name.startswith("transformer_blocks.") and name.endswith(".attn") else None
    if family == "flux":
        if name.endswith(".attn") and name.startswith("single_transformer_blocks."):
            return "flux_single"
        return "flux" if name.startswith("transformer_blocks.") and name.endswith(".attn") else None
    raise InjectionError(f"no user injection for backbone family {family!r}")


def _text_key(attn: nn.Module, kind: str) -> nn.Linear:
    """The layer's text-key projection (the user keys copy its shape and initial weights)."""
    lin = attn.to_k if kind in ("cross", "flux_single") else attn.add_k_proj
    return getattr(lin, "base_layer", lin)  # under a LoRA, the frozen base linear


def _heads(q: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """``[B, L, H*h] -> [B, H, L, h]``."""
    return q.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


class UserAttnProcessor(nn.Module):
    """The original processor plus a user branch (see the module docstring). ``__call__`` is defined
    explicitly so that diffusers sees ``ip_hidden_states`` in its signature and passes it on."""

    def __init__(self, base: Any, kind: str, text_key: nn.Linear, token_dim: int) -> None:
        super().__init__()
        self.base, self.kind, self.scale = base, kind, 1.0
        inner, bias = text_key.out_features, text_key.bias is not None
        self.to_k_user = nn.Linear(token_dim, inner, bias=bias)
        self.to_v_user = nn.Linear(token_dim, inner, bias=bias)
        with torch.no_grad():
            if text_key.in_features == token_dim:  # IP-Adapter: keys start as the text keys
                self.to_k_user.weight.copy_(text_key.weight.float())
                if bias:
                    self.to_k_user.bias.copy_(text_key.bias.float())
            nn.init.zeros_(self.to_v_user.weight)  # zero values: the new branch adds exactly nothing at first
            if bias:
                nn.init.zeros_(self.to_v_user.bias)

    def __call__(  # noqa: D102  (order: FluxAttention passes these five positionally)
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
        ip_hidden_states: torch.Tensor | None = None, temb: torch.Tensor | None = None,
    ) -> Any:
        if self.kind in ("flux", "flux_single"):
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        else:
            kw = {"temb": temb} if temb is not None else {}
            out = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kw)
        if ip_hidden_states is None or self.scale == 0:
            return out  # exactly the original layer
        delta = self.scale * self.user_attention(attn, hidden_states, ip_hidden_states)
        if isinstance(out, tuple):
            return (out[0] + delta.to(out[0].dtype), *out[1:])
        return out + delta.to(out.dtype)

    def user_attention(self, attn: nn.Module, hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``to_out(softmax(Q K_u^T / sqrt(h)) V_u) - to_out(0)``: the user branch through the output map."""
        dtype = hidden_states.dtype
        q = _heads(attn.to_q(hidden_states), attn)
        tokens = tokens.to(self.to_k_user.weight.dtype)
        k, v = _heads(self.to_k_user(tokens), attn), _heads(self.to_v_user(tokens), attn)
        if self.kind == "flux_single":  # one stream: the layer's own query and key norms
            if getattr(attn, "norm_q", None) is not None:
                q = attn.norm_q(q)
            if getattr(attn, "norm_k", None) is not None:
                k = attn.norm_k(k)
        elif self.kind != "cross":  # SD3/FLUX normalise queries and context keys per head
            if getattr(attn, "norm_q", None) is not None:
                q = attn.norm_q(q)
            if getattr(attn, "norm_added_k", None) is not None:
                k = attn.norm_added_k(k)
        elif getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        q = q.to(k.dtype)
        u = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).to(dtype)
        if self.kind == "flux_single":  # no output map in the layer: proj_out (linear) follows in the block
            return u
        lin = attn.to_out[0]
        delta = lin(u) - lin(torch.zeros_like(u[:1, :1]))
        return delta / float(getattr(attn, "rescale_output_factor", 1.0))


def _project_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Denoiser pre-hook: ``{"user_embedding": e}`` in the attention kwargs -> projected ``ip_hidden_states``."""
    for key in ("cross_attention_kwargs", "joint_attention_kwargs"):
        ak = kwargs.get(key)
        if ak and USER_KEY in ak:
            ak = dict(ak)
            e = ak.pop(USER_KEY)
            proj = module.user_projection
            ak[TOKENS_KEY] = proj(e.to(proj.proj.weight.dtype))
            kwargs[key] = ak
    return args, kwargs


def family_of(backbone: Any) -> str:
    return str(getattr(backbone, "family", ""))


def has_injection(model: nn.Module) -> bool:
    return isinstance(getattr(_unwrap(model), "user_projection", None), UserProjection)


def install_injection(backbone: Any, embed_dim: int, tokens: int = 4, scale: float = 1.0,
                      layers: list[str] | None = None) -> InjectionConfig:
    """Add a user branch to every text-attention layer of ``backbone``'s denoiser (see module docstring).

    The new weights are trainable (``requires_grad``), fp32, on the denoiser's device; everything else
    keeps its state. Returns the injection's config (what ``save_injection`` writes). ``layers``: only
    these of the eligible layers (``load_injection`` passes a file's own list, so a FLUX injection saved
    before the single-stream blocks had a branch still loads).
    """
    model = _unwrap(backbone.denoiser)
    if has_injection(model):
        raise InjectionError("the denoiser already has a user injection (remove_injection first)")
    if embed_dim <= 0 or tokens <= 0:
        raise InjectionError(f"embed_dim and tokens must be positive, got {embed_dim} and {tokens}")
    family = family_of(backbone)
    procs = dict(model.attn_processors)
    modules = dict(model.named_modules())
    chosen = {}
    for name in procs:
        mod_name = name.removesuffix(".processor")
        kind = _kind(modules[mod_name], mod_name, family)
        if kind is not None:
            chosen[name] = (modules[mod_name], kind)
    if layers is not None:
        chosen = {n: v for n, v in chosen.items() if n.removesuffix(".processor") in set(layers)}
    if not chosen:
        raise InjectionError(f"{type(model).__name__}: no text-attention layer found for a user branch")
    token_dims = {_text_key(m, k).in_features for m, k in chosen.values()}
    if len(token_dims) != 1:
        raise InjectionError(f"text-key input sizes differ across layers ({sorted(token_dims)}); cannot share tokens")
    token_dim = token_dims.pop()
    param = next(model.parameters())
    for name, (mod, kind) in chosen.items():
        if kind == "cross" and (getattr(mod, "group_norm", None) is not None or getattr(mod, "spatial_norm", None) is not None):
            raise InjectionError(f"{name}: cross-attention with group/spatial norm is not supported")
        procs[name] = UserAttnProcessor(procs[name], kind, _text_key(mod, kind), token_dim).to(param.device)
    model.set_attn_processor(procs)
    model.add_module("user_projection", UserProjection(embed_dim, tokens, token_dim).to(param.device))
    model._user_hook = model.register_forward_pre_hook(_project_hook, with_kwargs=True)
    cfg = InjectionConfig(embed_dim=embed_dim, tokens=tokens, scale=scale, family=family, token_dim=token_dim,
                          layers=sorted(n.removesuffix(".processor") for n in chosen))
    model._user_injection_config = cfg
    set_scale(backbone, scale)
    return cfg


def user_processors(model: nn.Module) -> dict[str, UserAttnProcessor]:
    return {n: p for n, p in _unwrap(model).attn_processors.items() if isinstance(p, UserAttnProcessor)}


def injection_config(backbone: Any) -> InjectionConfig:
    model = _unwrap(backbone.denoiser)
    if not has_injection(model):
        raise InjectionError("the denoiser has no user injection (install_injection or load_injection first)")
    return model._user_injection_config


def injection_parameters(backbone: Any) -> list[nn.Parameter]:
    """The injection's own weights (projection, user keys and values): what trains without a LoRA."""
    model = _unwrap(backbone.denoiser)
    params = list(model.user_projection.parameters())
    for p in user_processors(model).values():
        params += [*p.to_k_user.parameters(), *p.to_v_user.parameters()]
    return params


def set_scale(backbone: Any, scale: float) -> None:
    """Weight of the user branch in every layer (0: the unconditioned model, exactly)."""
    import math

    if not math.isfinite(scale):
        raise InjectionError(f"injection scale must be finite, got {scale}")
    for p in user_processors(backbone.denoiser).values():
        p.scale = float(scale)
    injection_config(backbone).scale = float(scale)


def remove_injection(backbone: Any) -> None:
    """Restore the original processors and drop the projection and hook."""
    model = _unwrap(backbone.denoiser)
    if not has_injection(model):
        return
    procs = {n: (p.base if isinstance(p, UserAttnProcessor) else p) for n, p in model.attn_processors.items()}
    model.set_attn_processor(procs)
    model._user_hook.remove()
    del model.user_projection
    del model._user_hook, model._user_injection_config


def injection_state_dict(backbone: Any) -> dict[str, torch.Tensor]:
    model = _unwrap(backbone.denoiser)
    out = {f"projection.{k}": v for k, v in model.user_projection.state_dict().items()}
    for name, p in user_processors(model).items():
        layer = name.removesuffix(".processor")
        for k, v in p.state_dict().items():
            out[f"{layer}.{k}"] = v
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_injection(backbone: Any, path: str | Path) -> Path:
    """Write the injection's weights and settings to one safetensors file (refuses to overwrite)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = injection_config(backbone)
    tmp = path.with_name(path.name + ".tmp")
    save_file(injection_state_dict(backbone), str(tmp), metadata={"format": FORMAT, "config": json.dumps(asdict(cfg))})
    tmp.replace(path)
    return path


def read_injection_config(path: str | Path) -> InjectionConfig:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such injection file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise InjectionError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise InjectionError(f"{path}: not a diffalign user injection (format {meta.get('format')!r})")
    return InjectionConfig(**json.loads(meta["config"]))


def load_injection(backbone: Any, path: str | Path, scale: float | None = None) -> InjectionConfig:
    """Install the injection saved at ``path`` into ``backbone`` and load its weights (strict)."""
    from safetensors.torch import load_file

    cfg = read_injection_config(path)
    fam = family_of(backbone)
    if cfg.family and cfg.family != fam:
        raise InjectionError(f"{path}: injection trained for the {cfg.family} family, the model is {fam}")
    new = install_injection(backbone, cfg.embed_dim, cfg.tokens, cfg.scale if scale is None else scale,
                            layers=cfg.layers or None)
    if new.layers != cfg.layers or new.token_dim != cfg.token_dim:
        remove_injection(backbone)
        raise InjectionError(f"{path}: saved for other attention layers ({len(cfg.layers)} layers, token dim "
                             f"{cfg.token_dim}) than this model has ({len(new.layers)}, {new.token_dim})")
    state = load_file(str(path))
    model = _unwrap(backbone.denoiser)
    own = injection_state_dict(backbone)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        remove_injection(backbone)
        raise InjectionError(f"{path}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"wrong shape {bad[:3]})")
    with torch.no_grad():
        model.user_projection.load_state_dict({k[len("projection."):]: v for k, v in state.items()
                                                if k.startswith("projection.")})
        for name, p in user_processors(model).items():
            layer = name.removesuffix(".processor")
            p.load_state_dict({k[len(layer) + 1:]: v for k, v in state.items() if k.startswith(layer + ".")})
    return new


# ------------------------------------------------------------------------------- conditioning


def with_user(cond: Any, embedding: torch.Tensor | None) -> Any:
    """A copy of ``cond`` whose rows carry ``embedding`` (``[D]`` for all rows or ``[B, D]``); None removes it."""
    from .base import Cond

    tensors = {k: v for k, v in cond.tensors.items() if k != USER_KEY}
    if embedding is not None:
        n = len(cond)
        e = embedding.reshape(1, -1).expand(n, -1) if embedding.ndim == 1 else embedding
        if e.shape[0] != n:
            raise ValueError(f"user embedding has {e.shape[0]} rows, the conditioning {n}")
        tensors[USER_KEY] = e.float()
    return Cond(tensors)


def without_user(cond: Any) -> Any:
    return with_user(cond, None)

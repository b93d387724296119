"""The real SD1.5, SDXL and SD3-Medium denoiser architectures with random weights, for speed benchmarks
(``model.path: arch:sd15`` / ``arch:sdxl`` / ``arch:sd3``). Nothing is downloaded.

The UNet / transformer and the VAE have the official configs (the ``config.json`` of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 and
stabilityai/stable-diffusion-3-medium-diffusers), so their FLOPs and memory per step are those of the
real models. The text encoders keep the real widths (what the denoiser's cross-attention sees) but, unless
``full_text=True``, only ``text_layers`` transformer layers: a 4.7 B-parameter T5-XXL with random weights
would measure nothing the latent and text-embedding cache does not remove from a training step anyway.
The weights are random (``torch.manual_seed``): the images are noise, the arithmetic is the real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

ARCHS = ("sd15", "sdxl", "sd3")


def _clip(hidden: int, layers: int, heads: int, inter: int, projection: int, act: str, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_hidden_layers=layers, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _clip_l(layers: int, with_projection: bool = False) -> Any:
    return _clip(768, layers, 12, 3072, 768, "quick_gelu", with_projection)


def _clip_g(layers: int) -> Any:
    return _clip(1280, layers, 20, 5120, 1280, "gelu", True)


def _vae(flow: bool) -> Any:
    from diffusers import AutoencoderKL

    kw: dict[str, Any] = dict(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16 if flow else 4, norm_num_groups=32, sample_size=1024 if flow else 512,
    )
    if flow:
        kw.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    else:
        kw.update(scaling_factor=0.18215)
    return AutoencoderKL(**kw)


def _denoiser(arch: str) -> Any:
    """The UNet / transformer of ``arch`` with its official config."""
    import diffusers as d

    if arch == "sd15":
        return d.UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        )
    if arch == "sdxl":
        return d.UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        )
    if arch == "sd3":
        return d.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192,
        )
    raise ValueError(f"unknown architecture {arch!r} (model.path arch:NAME); choose from {', '.join(ARCHS)}")


def build_arch_pipeline(arch: str, seed: int = 0, *, text_layers: int = 1, full_text: bool = False) -> Any:
    """A diffusers pipeline of the real ``arch`` architecture ('sd15', 'sdxl', 'sd3') with random weights,
    every module in eval mode. ``full_text``: the text encoders' real depth (SD3's T5 then has 24 layers)."""
    import diffusers as d

    from .tiny import _tokenizers

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r} (model.path arch:NAME); choose from {', '.join(ARCHS)}")
    with tempfile.TemporaryDirectory(prefix="diffalign_tok_") as tmp:
        tok = _tokenizers(Path(tmp), t5=arch == "sd3")
    torch.manual_seed(seed)
    if arch == "sd15":
        unet = _denoiser(arch)
        torch.manual_seed(seed + 1)
        vae = _vae(flow=False)
        torch.manual_seed(seed + 2)
        te = _clip_l(12 if full_text else text_layers)
        sched = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
        pipe = d.StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok["clip"], unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    elif arch == "sdxl":
        unet = _denoiser(arch)
        torch.manual_seed(seed + 1)
        vae = _vae(flow=False)
        vae.register_to_config(scaling_factor=0.13025)
        torch.manual_seed(seed + 2)
        te, te2 = _clip_l(12 if full_text else text_layers), _clip_g(32 if full_text else text_layers)
        sched = d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading")
        pipe = d.StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok["clip"], tokenizer_2=tok["clip"], unet=unet,
            scheduler=sched, image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
        )
    else:
        from transformers import T5Config, T5EncoderModel

        from .tokenizers import T5_WORDS

        tr = _denoiser(arch)
        torch.manual_seed(seed + 1)
        vae = _vae(flow=True)
        torch.manual_seed(seed + 2)
        te, te2 = _clip_l(12 if full_text else text_layers, True), _clip_g(32 if full_text else text_layers)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(T5_WORDS) + 3, d_model=4096, d_kv=64, d_ff=10240, num_layers=24 if full_text else text_layers,
            num_heads=64, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=False,
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        pipe = d.StableDiffusion3Pipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=te, tokenizer=tok["clip"], text_encoder_2=te2, tokenizer_2=tok["clip"],
            text_encoder_3=t5, tokenizer_3=tok["t5"],
        )
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    return pipe


def denoiser_params(arch: str) -> int:
    """Parameter count of ``arch``'s denoiser (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = _denoiser(arch)
    return sum(p.numel() for p in model.parameters())

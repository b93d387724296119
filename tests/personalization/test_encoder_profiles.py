"""User encoders (CLIP image features, a tiny vision-language model) and profile files."""

import pytest
import torch

from diffalign.personalization.encoder import (
    CLIPPairEncoder,
    EncoderError,
    VLMEncoder,
    load_encoder,
    user_embedding,
)
from diffalign.personalization.profiles import Profile, ProfileError, create_profile, mix_profiles, parse_spec


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from rewards.testing import tiny_hf_clip, write_clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tiny_hf_clip(seed=0).save_pretrained(str(d))
    write_clip_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    from rewards.testing import tiny_open_clip, tiny_open_clip_cfg

    d = tmp_path_factory.mktemp("oc")
    torch.save(tiny_open_clip(seed=0).state_dict(), d / "oc.bin")
    return d / "oc.bin", tiny_open_clip_cfg()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny LLaVA (CLIP vision tower + 2-layer Llama) with a word-level tokenizer, saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "Prompt:", "Preferred:", "Rejected:",
             "a", "red", "blue", "green", "circle", "square", "triangle"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    d = tmp_path_factory.mktemp("vlm")
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return d


def _triples(k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"][:k]
    return prompts, torch.rand(k, 3, 32, 32, generator=g), torch.rand(k, 3, 32, 32, generator=g)


def _order_free(enc):
    prompts, w, lose = _triples()
    e = user_embedding(enc, prompts, w, lose)
    perm = [3, 0, 4, 2, 1]
    e2 = user_embedding(enc, [prompts[i] for i in perm], w[perm], lose[perm])
    assert e.shape == (enc.dim,)
    assert torch.allclose(e, e2, atol=1e-6)
    assert abs(float(e.norm()) - 1) < 1e-5
    # a different choice (swap one pair) changes the embedding
    w2, l2 = w.clone(), lose.clone()
    w2[0], l2[0] = lose[0], w[0]
    assert not torch.allclose(user_embedding(enc, prompts, w2, l2), e, atol=1e-4)
    return e


def test_clip_encoder_is_order_free(clip_dir):
    enc = load_encoder(f"clip={clip_dir}")
    assert enc.name == f"clip={clip_dir}" and enc.dim == 16
    _order_free(enc)


def test_open_clip_encoder(open_clip_file, monkeypatch):
    path, cfg = open_clip_file
    import open_clip

    monkeypatch.setattr(open_clip, "get_model_config", lambda name: cfg if name == "tiny" else None)
    enc = load_encoder(f"open_clip={path}@tiny")
    _order_free(enc)
    with pytest.raises(EncoderError, match="FILE@MODEL_NAME"):
        load_encoder(f"open_clip={path}")


def test_clip_patch_features(clip_dir, open_clip_file, monkeypatch):
    """Patch features: the last layer's patch tokens pooled to a grid; order-free; the grid is set by '#N'."""
    enc = load_encoder(f"clip_patches={clip_dir}")
    width = enc.clip.model.config.vision_config.hidden_size
    n = enc.clip.image_size // enc.clip.model.config.vision_config.patch_size
    assert enc.name == f"clip_patches={clip_dir}" and enc.dim == min(4, n) ** 2 * width
    _order_free(enc)
    pooled = load_encoder(f"clip={clip_dir}")
    prompts, w, lose = _triples(2)
    assert not torch.allclose(enc.encode_triples(prompts, w, lose)[:, :pooled.dim], pooled.encode_triples(prompts, w, lose))
    one = load_encoder(f"clip_patches={clip_dir}#1")  # a 1 x 1 grid: the mean patch token
    assert one.dim == width and one.name.endswith("#1")
    toks = one.clip.model.vision_model(pixel_values=torch.zeros(1, 3, enc.clip.image_size, enc.clip.image_size))
    assert toks.last_hidden_state.shape[1] == n * n + 1
    for bad in ("#0", "#x"):
        with pytest.raises(EncoderError, match="positive integer"):
            load_encoder(f"clip_patches={clip_dir}{bad}")
    with pytest.raises(EncoderError, match="'pooled' or 'patches'"):
        CLIPPairEncoder.from_path(clip_dir, features="tokens")
    path, cfg = open_clip_file
    import open_clip

    monkeypatch.setattr(open_clip, "get_model_config", lambda name: cfg if name == "tiny" else None)
    oc = load_encoder(f"open_clip_patches={path}@tiny")
    assert oc.name == f"open_clip_patches={path}@tiny" and oc.dim > 0
    _order_free(oc)


def test_vlm_encoder_tiny_llava(vlm_dir):
    enc = VLMEncoder.from_pretrained(vlm_dir)
    assert enc.dim == 24
    _order_free(enc)
    mean_enc = load_encoder(f"vlm={vlm_dir}")
    mean_enc.pooling, mean_enc.layer = "mean", 1
    _order_free(mean_enc)
    with pytest.raises(EncoderError, match="out of range"):
        VLMEncoder.from_pretrained(vlm_dir, layer=9).encode_triples(*_triples(1))


def test_encoder_errors(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(f"clip={tmp_path / 'nope'}")
    with pytest.raises(EncoderError, match="unknown kind"):
        load_encoder("siglip=x")
    with pytest.raises(EncoderError, match="config.json"):
        load_encoder(f"vlm={tmp_path}")


def test_profile_roundtrip_and_order(clip_dir, tmp_path):
    enc = CLIPPairEncoder.from_path(clip_dir)
    prompts, w, lose = _triples(4)
    p = create_profile(enc, prompts, w, lose, user_id="alice", source="pairs.jsonl", min_pairs=4)
    path = p.save(tmp_path / "alice.profile")
    assert path.stat().st_size < 4096
    q = Profile.load(path)
    assert torch.equal(q.embedding, p.embedding) and (q.user_id, q.pairs, q.encoder) == ("alice", 4, enc.name)
    perm = [2, 3, 1, 0]
    r = create_profile(enc, [prompts[i] for i in perm], w[perm], lose[perm], user_id="alice")
    assert torch.allclose(r.embedding, p.embedding, atol=1e-6)
    with pytest.raises(FileExistsError):
        p.save(path)
    with pytest.raises(ProfileError, match="'bob' has 3 decided pairs in x.jsonl; at least 4"):
        create_profile(enc, prompts[:3], w[:3], lose[:3], user_id="bob", source="x.jsonl", min_pairs=4)
    (tmp_path / "junk.profile").write_bytes(b"garbage")
    with pytest.raises(ProfileError, match="junk.profile"):
        Profile.load(tmp_path / "junk.profile")


def test_interpolation_weights_are_validated(tmp_path):
    a = Profile(torch.tensor([1.0, 0.0, 0.0]), user_id="a", encoder="clip=x").save(tmp_path / "a.profile")
    b = Profile(torch.tensor([0.0, 1.0, 0.0]), user_id="b", encoder="clip=x").save(tmp_path / "b.profile")
    c = Profile(torch.tensor([0.0, 1.0]), user_id="c", encoder="clip=y").save(tmp_path / "c.profile")
    mixed = mix_profiles(f"{a}:0.7,{b}:0.3")
    assert torch.allclose(mixed.embedding, torch.tensor([0.7, 0.3, 0.0]))
    assert torch.equal(mix_profiles(str(a)).embedding, torch.tensor([1.0, 0.0, 0.0]))
    assert parse_spec("x.profile:0.25, y.profile:0.75") == [("x.profile", 0.25), ("y.profile", 0.75)]
    for spec, msg in [
        (f"{a}:0.7,{b}:abc", "'abc' is not a number"),
        (f"{a}:0.7,{b}:0.2", "sum to 0.9"),
        (f"{a}:1.5,{b}:-0.5", "-0.5 must be finite and >= 0"),
        (f"{a}:nan,{b}:0.5", "nan must be finite"),
        (f"{a}:0.5,,{b}:0.5", "empty part"),
        ("", "empty profile spec"),
        (f"{a}:0.5,{tmp_path / 'missing.profile'}:0.5", "missing.profile"),
        (f"{a}:0.5,{c}:0.5", "must share an encoder"),
    ]:
        with pytest.raises(ProfileError, match=msg):
            mix_profiles(spec)

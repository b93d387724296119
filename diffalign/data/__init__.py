"""Preference data: Pick-a-Pic-schema pairs (pixels) and the on-disk latent cache."""

from .cache import (
    CachedPairs,
    CacheError,
    StaleCacheError,
    build_cache,
    cache_main,
    collate_cached,
    data_fingerprint,
    is_cached_batch,
)
from .pairs import (
    PairDataError,
    PreferencePairs,
    collate_pairs,
    decode_image,
    image_to_tensor,
)

__all__ = [
    "CacheError",
    "CachedPairs",
    "PairDataError",
    "PreferencePairs",
    "StaleCacheError",
    "build_cache",
    "cache_main",
    "collate_cached",
    "collate_pairs",
    "data_fingerprint",
    "decode_image",
    "image_to_tensor",
    "is_cached_batch",
]

"""Prompt sources for online training (reward feedback, policy optimisation): prompts only, no images.

A source is one of:

* ``toy:train`` / ``toy:heldout``: every caption of the toy grammar's split (``toyworld.shapes.prompts``,
  fixed order); ``toy:train:N`` / ``toy:heldout:N`` draws N of them (half single-, half two-object, seed 0);
  ``toy:train:N:F`` draws N with a fraction F of two-object scenes (``shapes.prompt_mix``, seed 0).
* a ``.jsonl`` file: one JSON object per line with a ``"prompt"`` (or ``"caption"``) string; blank lines
  are skipped; a row may name its reference image(s) for identity rewards and identity adapters
  (ID-Aligner): ``"reference": "faces/ada.png"`` or a list of paths (relative to the file's folder; every
  row then needs the same number), read by ``load_prompt_references``;
* any other file: plain text, one prompt per line; blank lines and lines starting with ``#`` are skipped.

A bad line (not JSON, no prompt field, an empty or non-string prompt, over ``max_chars``) is a
``PromptDataError`` that names the file and the 1-based line. Prompts are kept as written (surrounding
whitespace stripped); the tokenizer truncates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

MAX_PROMPT_CHARS = 10_000


class PromptDataError(ValueError):
    """A prompt file that cannot be read (names the file and line)."""


def load_prompts(source: str | Path, max_chars: int = MAX_PROMPT_CHARS) -> list[str]:
    """The prompts of ``source`` (see the module docstring), in order."""
    s = str(source)
    if s.startswith("toy:"):
        return _toy_prompts(s)
    path = Path(s)
    if not path.is_file():
        raise PromptDataError(f"{path}: no such prompt file (a .txt / .jsonl file, or toy:train / toy:heldout)")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = _jsonl(path, lines, max_chars) if path.suffix.lower() == ".jsonl" else _text(path, lines, max_chars)
    if not out:
        raise PromptDataError(f"{path}: no prompts in the file")
    return out


def _toy_prompts(spec: str) -> list[str]:
    from ..toyworld.shapes import prompt_mix, prompts  # the toy grammar (a leaf module: no import cycle)

    parts = spec.split(":")
    if len(parts) not in (2, 3, 4) or parts[1] not in ("train", "heldout"):
        raise PromptDataError(f"prompt source {spec!r}: expected toy:train, toy:heldout, toy:<split>:<N> "
                              "or toy:<split>:<N>:<two-object fraction>")
    n = None
    if len(parts) >= 3:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise PromptDataError(f"prompt source {spec!r}: N must be a positive integer")
        n = int(parts[2])
    if len(parts) == 4:
        try:
            frac = float(parts[3])
        except ValueError:
            frac = -1.0
        if not 0 <= frac <= 1:
            raise PromptDataError(f"prompt source {spec!r}: the two-object fraction must be a number in [0, 1]")
        try:
            return prompt_mix(parts[1], n, frac, seed=0)  # type: ignore[arg-type]
        except ValueError as e:  # more captions of one kind than the split has
            raise PromptDataError(f"prompt source {spec!r}: {e}") from e
    return prompts(parts[1], n=n, seed=0)  # type: ignore[arg-type]


def _check(path: Path, lineno: int, prompt: object, max_chars: int) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptDataError(f"{path}, line {lineno}: the prompt must be a non-empty string, got {prompt!r}")
    if len(prompt) > max_chars:
        raise PromptDataError(f"{path}, line {lineno}: prompt of {len(prompt)} characters (over {max_chars})")
    return prompt.strip()


def _text(path: Path, lines: list[str], max_chars: int) -> list[str]:
    return [_check(path, i, ln, max_chars) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]


def _jsonl(path: Path, lines: list[str], max_chars: int) -> list[str]:
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            raise PromptDataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise PromptDataError(f"{path}, line {i}: expected a JSON object with a \"prompt\" field")
        key = "prompt" if "prompt" in rec else "caption" if "caption" in rec else None
        if key is None:
            raise PromptDataError(f"{path}, line {i}: no \"prompt\" or \"caption\" field (keys: {sorted(rec)})")
        out.append(_check(path, i, rec[key], max_chars))
    return out


def load_prompt_references(source: str | Path) -> list[torch.Tensor] | None:
    """The reference images of a ``.jsonl`` prompt file's rows (``"reference"``: a path or a list of paths,
    relative to the file's folder), one ``[K,3,H,W]`` tensor per prompt; None when no row has one. A row
    without one, a missing or unreadable file, or rows with different K or sizes are errors naming the
    file and line."""
    from rewards.references import ReferenceError, stack_images

    path = Path(str(source))
    if str(source).startswith("toy:") or path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    rows = [(i, json.loads(ln)) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    if not any(isinstance(r, dict) and "reference" in r for _, r in rows):
        return None
    out: list[torch.Tensor] = []
    for i, rec in rows:
        ref = rec.get("reference")
        if ref is None:
            raise PromptDataError(f"{path}, line {i}: no \"reference\" (other rows have one: give every row one)")
        names = [ref] if isinstance(ref, str) else ref
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise PromptDataError(f"{path}, line {i}: \"reference\" must be a path or a list of paths, got {ref!r}")
        try:
            out.append(stack_images([path.parent / n for n in names], f"{path}, line {i}"))
        except ReferenceError as e:
            raise PromptDataError(str(e)) from None
        if out[-1].shape != out[0].shape:
            raise PromptDataError(f"{path}, line {i}: references of shape {tuple(out[-1].shape)}, but the first row's "
                                  f"are {tuple(out[0].shape)} (same count and size in every row)")
    return out


class PromptDataset(Dataset):
    """Prompts as a torch Dataset: item i is ``{"prompt": str, "row": i}``, plus ``"reference"`` ``[K,3,H,W]``
    when the rows have reference images (or ``references`` is given: one ``[K,3,H,W]`` set shared by every
    row) and ``"embedding"`` ``[D]`` when an ``encoder`` (reference images -> one embedding, e.g. an
    identity adapter's) is given."""

    def __init__(self, source: str | Path | list[str], max_chars: int = MAX_PROMPT_CHARS,
                 references: torch.Tensor | None = None, encoder: Any = None) -> None:
        self.source = source if not isinstance(source, list) else "<list>"
        self.prompts = list(source) if isinstance(source, list) else load_prompts(source, max_chars)
        if not self.prompts:
            raise PromptDataError(f"{self.source}: no prompts")
        rows = None if isinstance(source, list) else load_prompt_references(source)
        self.references: list[torch.Tensor] | None = rows
        if rows is None and references is not None:  # one shared set: the same tensor object in every item
            shared = references.reshape(-1, *references.shape[-3:])
            self.references = [shared] * len(self.prompts)
        self.encoder = encoder
        self._embedding_cache: dict[int, torch.Tensor] = {}
        if encoder is not None and self.references is None:
            raise PromptDataError(f"{self.source}: an image encoder needs reference images (a \"reference\" per "
                                  "jsonl row, or reward.reference_faces)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        item: dict[str, Any] = {"prompt": self.prompts[i], "row": i}
        if self.references is not None:
            item["reference"] = self.references[i]
            if self.encoder is not None:
                key = id(self.references[i])
                if key not in self._embedding_cache:
                    with torch.no_grad():
                        self._embedding_cache[key] = self.encoder(self.references[i]).detach().float().cpu()
                item["embedding"] = self._embedding_cache[key]
        return item


def collate_prompts(items: list[dict]) -> dict[str, Any]:
    """A batch ``{"prompts": list[str], "rows": list[int]}`` (the loop adds ``"cond"``); with references also
    ``"references"`` ``[B,K,3,H,W]`` (``[1,K,3,H,W]`` when every row shares one set) and with embeddings
    ``"cond_extra": {"user_embedding": [B,D]}`` (the decoupled cross-attention's input)."""
    out: dict[str, Any] = {"prompts": [it["prompt"] for it in items], "rows": [it["row"] for it in items]}
    if "reference" in items[0]:
        first = items[0]["reference"]
        shared = all(it["reference"] is first for it in items)
        out["references"] = first[None] if shared else torch.stack([it["reference"] for it in items])
    if "embedding" in items[0]:
        out["cond_extra"] = {"user_embedding": torch.stack([it["embedding"] for it in items])}
    return out

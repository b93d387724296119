"""Prompt sources for online training (reward feedback, policy optimisation): prompts only, no images.

A source is one of:

* ``toy:train`` / ``toy:heldout``: every caption of the toy grammar's split (``toyworld.shapes.prompts``,
  fixed order); ``toy:train:N`` / ``toy:heldout:N`` draws N of them (half single-, half two-object, seed 0).
* a ``.jsonl`` file: one JSON object per line with a ``"prompt"`` (or ``"caption"``) string; blank lines
  are skipped;
* any other file: plain text, one prompt per line; blank lines and lines starting with ``#`` are skipped.

A bad line (not JSON, no prompt field, an empty or non-string prompt, over ``max_chars``) is a
``PromptDataError`` that names the file and the 1-based line. Prompts are kept as written (surrounding
whitespace stripped); the tokenizer truncates.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    from ..toyworld.shapes import prompts  # the toy grammar (a leaf module: no import cycle)

    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("train", "heldout"):
        raise PromptDataError(f"prompt source {spec!r}: expected toy:train, toy:heldout or toy:<split>:<N>")
    n = None
    if len(parts) == 3:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise PromptDataError(f"prompt source {spec!r}: N must be a positive integer")
        n = int(parts[2])
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


class PromptDataset(Dataset):
    """Prompts as a torch Dataset: item i is ``{"prompt": str, "row": i}``."""

    def __init__(self, source: str | Path | list[str], max_chars: int = MAX_PROMPT_CHARS) -> None:
        self.source = source if not isinstance(source, list) else "<list>"
        self.prompts = list(source) if isinstance(source, list) else load_prompts(source, max_chars)
        if not self.prompts:
            raise PromptDataError(f"{self.source}: no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "row": i}


def collate_prompts(items: list[dict]) -> dict[str, list]:
    """A batch ``{"prompts": list[str], "rows": list[int]}`` (the loop adds ``"cond"``)."""
    return {"prompts": [it["prompt"] for it in items], "rows": [it["row"] for it in items]}

"""Reward-hacking guard for online training: "gold" rewards on held-out prompts beside the training reward.

Every ``gold_every`` optimizer steps the loop calls ``GoldMonitor.evaluate``: the current policy samples
the held-out prompts from FIXED starting noise (the same noise at every evaluation, so the curves move
only because the model does), and the training reward and every gold reward score the images (each
ensemble member separately). The history goes to ``gold.jsonl`` in the run folder and to one plot,
``gold.png``: the training reward and the gold rewards against the step, each relative to its value at
the first evaluation (so rewards on different scales share an axis).

Early stop (``early_stop_on_gold_drop: d``): training stops when a gold reward falls more than ``d``
below its best value so far (absolute units of that reward). With no gold reward it never stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _members(name: str, reward: Any) -> dict[str, Any]:
    """An ensemble's members by name (``name/member``) plus the ensemble itself; a single reward as is."""
    out = {name: reward}
    if hasattr(reward, "members"):
        out.update({f"{name}/{n}": m for n, m in reward.members.items()})
    return out


class GoldMonitor:
    """Scores held-out samples with the training and gold rewards; decides the early stop; plots."""

    def __init__(self, backbone: Any, prompts: list[str], train_reward: Any, gold: dict[str, Any], out_dir: str | Path,
                 *, steps: int = 20, guidance_scale: float = 5.0, seed: int = 1234, batch_size: int = 32,
                 early_stop_on_gold_drop: float | None = None) -> None:
        if not prompts:
            raise ValueError("reward.gold_prompts: no held-out prompts to score")
        self.prompts = list(prompts)
        self.rewards = {**_members("train", train_reward)}
        for n, r in gold.items():
            self.rewards.update(_members(f"gold/{n}", r))
        self.gold_names = [n for n in self.rewards if n.startswith("gold/")]
        self.out = Path(out_dir)
        self.steps, self.guidance_scale, self.batch_size = steps, guidance_scale, batch_size
        self.drop = early_stop_on_gold_drop
        g = torch.Generator().manual_seed(seed)
        shape = backbone.latent_shape(1)[1:]
        self.noise = torch.stack([torch.randn(shape, generator=g) for _ in self.prompts])
        self.history: list[dict[str, float]] = self._load()

    def _load(self) -> list[dict[str, float]]:
        path = self.out / "gold.jsonl"
        if not path.is_file():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def resume_at(self, step: int) -> None:
        """Forget evaluations after ``step`` (a run resumed from an earlier checkpoint redoes them)."""
        self.history = [h for h in self.history if h["step"] <= step]

    @torch.no_grad()
    def evaluate(self, backbone: Any, step: int) -> dict[str, float]:
        """Sample the held-out prompts with the current policy and score them; appends to gold.jsonl."""
        from ..sampling.solvers import generate

        scores: dict[str, list[torch.Tensor]] = {n: [] for n in self.rewards}
        for i in range(0, len(self.prompts), self.batch_size):
            ps = self.prompts[i : i + self.batch_size]
            imgs = generate(backbone, ps, steps=self.steps, guidance_scale=self.guidance_scale,
                            latents=self.noise[i : i + len(ps)].to(backbone.device))
            for n, r in self.rewards.items():
                scores[n].append(r(imgs.to(_device(r, imgs)), ps).float().cpu())
        row = {"step": step, **{n: float(torch.cat(v).mean()) for n, v in scores.items()}}
        self.history = [h for h in self.history if h["step"] < step] + [row]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gold.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        return row

    def should_stop(self) -> str | None:
        """The reason to stop (a gold reward fell more than ``early_stop_on_gold_drop`` below its best), or None."""
        if self.drop is None or not self.history:
            return None
        last = self.history[-1]
        for n in self.gold_names:
            top = max(self.history, key=lambda h: h[n])  # the first row with the best value
            best = top[n]
            if best - last[n] > self.drop:
                return (f"early stop: gold reward {n[5:]} fell from its best {best:.4f} (step {top['step']}) to "
                        f"{last[n]:.4f} at step {last['step']} (more than early_stop_on_gold_drop={self.drop}); "
                        f"the weights of step {top['step']} are the checkpoint of that step, when one was saved")
        return None

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Training and gold rewards against the step, each minus its first value, in one figure."""
        if len(self.history) < 1:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.out / "gold.png")
        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for n in self.rewards:
            first = self.history[0][n]
            style = "-" if n == "train" else ":" if n.startswith("train/") else "--"
            ax.plot(steps, [h[n] - first for h in self.history], style, marker="o", ms=3, label=n)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("change since the first evaluation (held-out)")
        ax.set_title("training reward vs gold rewards")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build_gold_monitor(cfg: Any, backbone: Any, train_reward: Any, start_step: int) -> GoldMonitor | None:
    """The monitor of ``cfg.reward`` (None when ``gold_every`` is 0 or the objective has no reward)."""
    import rewards

    from ..data.prompts import load_prompts

    r = cfg.reward
    if not r.gold_every or train_reward is None:
        return None
    gold = {}
    for spec in r.gold:
        try:
            gold[spec.split("=")[0].split(":")[0]] = rewards.from_spec(spec).to(backbone.device)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"reward.gold {spec!r}: {e}") from e
    mon = GoldMonitor(backbone, load_prompts(r.gold_prompts), train_reward, gold, cfg.train.output_dir,
                      steps=cfg.train.sample_steps, guidance_scale=cfg.train.sample_guidance,
                      early_stop_on_gold_drop=r.early_stop_on_gold_drop)
    mon.resume_at(start_step)
    return mon


def gold_check(monitor: GoldMonitor | None, every: int, step: int, backbone: Any, accelerator: Any) -> str | None:
    """At every ``every``-th step (and step 0): evaluate on the main process (``monitor`` is None on the
    others), plot, and agree on all processes whether to stop. Returns the reason to stop, or None."""
    from .metrics import agreed_max

    if not every or step % every:
        return None
    reason = None
    if monitor is not None and not any(h["step"] == step for h in monitor.history):
        monitor.evaluate(backbone, step)
        monitor.plot()
    if monitor is not None:
        reason = monitor.should_stop()
    if agreed_max(accelerator, int(reason is not None)):
        return reason or "early stop: a gold reward fell (decided on the main process)"
    return None


def _device(reward: Any, images: torch.Tensor) -> torch.device:
    dev = getattr(reward, "device", None)
    return dev if dev is not None else images.device

"""The reward-hacking guard: gold rewards on held-out prompts, early stop, the plot."""

import json

import torch

from diffalign.training.gold import GoldMonitor
from rewards.ensemble import Ensemble
from tests.online.conftest import PROMPTS, Brightness, tiny


def test_gold_monitor_scores_logs_and_stops(tmp_path):
    bb = tiny("sd15", lora=True)
    train = Ensemble({"bright": Brightness(), "dark": Brightness(-1.0)})
    mon = GoldMonitor(bb, PROMPTS, train, {"dark": Brightness(-1.0)}, tmp_path, steps=2, guidance_scale=2.0,
                      early_stop_on_gold_drop=0.05)
    row = mon.evaluate(bb, step=0)
    assert set(row) == {"step", "train", "train/bright", "train/dark", "gold/dark"}
    torch.testing.assert_close(torch.tensor(row["gold/dark"]), torch.tensor(-row["train/bright"]))
    again = mon.evaluate(bb, step=0)  # same model, same fixed noise: the same numbers, history not duplicated
    assert again == row and len(mon.history) == 1
    assert mon.should_stop() is None
    mon.history.append({**row, "step": 10, "gold/dark": row["gold/dark"] - 0.1})
    reason = mon.should_stop()
    assert reason and "gold reward dark fell" in reason and "step 10" in reason
    assert "(step 0)" in reason and "weights of step 0" in reason  # names the step of the best value
    assert mon.plot().is_file()
    # a resumed run reads the history back
    lines = [json.loads(x) for x in (tmp_path / "gold.jsonl").read_text().splitlines()]
    assert lines == [row]
    assert GoldMonitor(bb, PROMPTS, Brightness(), {}, tmp_path).history == [row]


def test_no_gold_never_stops(tmp_path):
    bb = tiny("sd15")
    mon = GoldMonitor(bb, PROMPTS[:1], Brightness(), {}, tmp_path, steps=2, early_stop_on_gold_drop=0.0)
    mon.evaluate(bb, 0)
    assert mon.should_stop() is None

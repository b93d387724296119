"""`diffalign demo` at a tiny size: every stage runs, the outputs are written, bad sizes are refused."""

import json

from diffalign.cli import main


def test_demo_runs_dpo_and_nft_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--pair-prompts", "48", "--k", "4", "--steps", "2", "--checkpoint-every", "1",
               "--online-steps", "2", "--eval-prompts", "8"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["target_metric"] == "toy_shape"
    assert set(s["before"]) == set(s["after"]) == set(s["online"]["after"])
    assert s["online"]["objective"] == "nft" and s["online"]["steps"] == 2
    assert (out / "grid.png").is_file() and (out / "reward_curve.png").is_file()
    assert (out / "nft" / "final" / "lora").is_dir() and (out / "dpo" / "final" / "lora").is_dir()
    text = capsys.readouterr().out
    assert "NFT gain" in text and "base | DPO | NFT" in text
    args = ["demo", "--out", str(out), "--pair-prompts", "48", "--k", "4", "--steps", "2", "--checkpoint-every", "1",
            "--eval-prompts", "8"]
    assert main(args + ["--online-steps", "2"]) == 0  # the same settings: both LoRAs are reused
    text = capsys.readouterr().out
    assert "reusing the DPO LoRA" in text and "reusing the NFT LoRA" in text
    assert main(args + ["--online-steps", "3"]) == 2  # another step count: refused, never relabelled
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "train.steps: 2 there, 3 now" in err and str(out / "nft") in err


def test_demo_refuses_a_negative_online_step_count(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--online-steps", "-1"]) == 2
    assert "--online-steps" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

"""The command line end to end on a tiny budget: train, resume, eval, restore (tiled)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moe_restore.cli import main
from moe_restore.data import read_image, write_image


def test_train_eval_restore_end_to_end(tmp_path, capsys):
    clean_dir = tmp_path / "clean"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        write_image(clean_dir / f"photo{i}.png", torch.rand(3, 40, 48, generator=g))
    run = tmp_path / "run"
    common = ["--model", "m2ir-tiny", "--data", str(clean_dir), "--tasks", "noise,haze+rain", "--batch", "2",
              "--patch", "16", "--out", str(run), "--eval-every", "2", "--checkpoint-every", "1"]
    assert main(["train", *common, "--steps", "2"]) == 0
    assert main(["train", *common, "--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert (run / "eval_step2.md").is_file() and (run / "eval_step3.json").is_file()

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(clean_dir), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"noise", "haze+rain"} and "identity" in results["average"]
    assert "| noise | 1 |" in (out / "results.md").read_text()
    assert "PSNR" in capsys.readouterr().out

    big = torch.rand(3, 70, 90, generator=g)
    write_image(tmp_path / "big.jpg", big)
    restored_dir = tmp_path / "restored"
    assert main(["restore", "--checkpoint", str(run / "checkpoint.pt"), str(tmp_path / "big.jpg"),
                 "--out", str(restored_dir), "--tile", "48", "--overlap", "8", "--format", "png"]) == 0
    assert read_image(restored_dir / "big.png").shape == (3, 70, 90)


def test_bad_arguments_are_reported(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--tasks", "noise,snow", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="data"):
        main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path), "--steps", "1"])
    with pytest.raises(ValueError, match="checkpoint"):
        main(["eval", "--checkpoint", str(tmp_path / "none.pt")])


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "moe_restore", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(c in done.stdout for c in ("demo", "train", "eval", "restore", "bench"))


def test_mim_dit_trains_evaluates_beside_m2ir_and_restores(tmp_path, capsys):
    clean_dir = tmp_path / "clean"
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        write_image(clean_dir / f"photo{i}.png", torch.rand(3, 24, 32, generator=g))
    runs = {}
    for model in ("m2ir-tiny", "mim-dit-tiny"):
        runs[model] = tmp_path / model
        assert main(["train", "--model", model, "--data", str(clean_dir), "--tasks", "noise,rain", "--batch", "2",
                     "--patch", "16", "--out", str(runs[model]), "--steps", "2", "--eval-every", "0",
                     "--checkpoint-every", "2"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(runs["m2ir-tiny"] / "checkpoint.pt"),
                 str(runs["mim-dit-tiny"] / "checkpoint.pt"), "--data", str(clean_dir), "--out", str(out),
                 "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "side by side" in printed and "| noise |" in printed.split("side by side")[1]
    assert "m2ir-tiny" in printed and "mim-dit-tiny" in printed
    assert (out / "1-mim-dit-tiny" / "results.json").is_file()
    write_image(tmp_path / "odd.png", torch.rand(3, 19, 27, generator=g))
    assert main(["restore", "--checkpoint", str(runs["mim-dit-tiny"] / "checkpoint.pt"), str(tmp_path / "odd.png"),
                 "--out", str(tmp_path / "restored"), "--sample-steps", "2"]) == 0
    assert read_image(tmp_path / "restored" / "odd.png").shape == (3, 19, 27)

"""The command line end to end on a tiny budget: train, resume, eval, restore (tiled)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moe_restore.cli import main
from moe_restore.data import read_image, write_image
from moe_restore.errors import UserError
from moe_restore.models import build
from moe_restore.train.checkpoint import load_checkpoint, save_checkpoint


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


def test_version_and_complete_help(capsys):
    """--version prints the package version; every option of every command has a help text, and
    train's --model names every registered model."""
    import argparse

    from moe_restore import __version__
    from moe_restore.cli import build_parser
    from moe_restore.models import names

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"moe-restore {__version__}"
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)
    model_help = next(a.help for a in commands["train"]._actions if "--model" in a.option_strings)
    assert all(model in model_help for model in names())


def _refused(capsys, argv: list[str], status: int) -> str:
    """Run the command line on a mistake; returns the one line it wrote on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("moe-restore"), err
    return err


@pytest.mark.parametrize("argv, named", [
    (["train", "--out", "r", "--steps", "0"], "--steps"),
    (["train", "--out", "r", "--steps", "ten"], "--steps"),
    (["train", "--out", "r", "--batch", "0"], "--batch"),
    (["train", "--out", "r", "--patch", "12"], "multiple of 8"),
    (["train", "--out", "r", "--patch", "0"], "--patch"),
    (["train", "--out", "r", "--lr", "-1e-3"], "--lr"),
    (["train", "--out", "r", "--lr", "nan"], "--lr"),
    (["train", "--out", "r", "--eval-every", "-1"], "--eval-every"),
    (["train", "--out", "r", "--workers", "-2"], "--workers"),
    (["train", "--out", "r", "--tasks", "noise,snow"], "snow"),
    (["train", "--out", "r", "--resume", "--overwrite"], "not allowed with"),
    (["train", "--out", "r", "--device", "tpu"], "--device"),
    (["eval", "--checkpoint", "c.pt", "--tile", "0"], "--tile"),
    (["restore", "--checkpoint", "c.pt", "in.png", "--out", "o", "--tile", "0"], "--tile"),
    (["restore", "--checkpoint", "c.pt", "in.png", "--out", "o", "--overlap", "-1"], "--overlap"),
    (["restore", "--checkpoint", "c.pt", "in.png", "--out", "o", "--sample-steps", "0"], "--sample-steps"),
    (["eval", "--checkpoint", "c.pt", "--sample-steps", "-4"], "--sample-steps"),
    (["demo", "--steps", "0"], "--steps"),
    (["train"], "--out"),
])
def test_bad_options_are_refused_as_they_are_parsed(capsys, argv, named):
    assert named in _refused(capsys, argv, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    assert "CUDA is not available" in _refused(capsys, ["train", "--out", "r", "--device", "cuda"], 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of a 1-step m2ir-tiny and its clean-image folder."""
    root = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(2)
    for i in range(2):
        write_image(root / "clean" / f"photo{i}.png", torch.rand(3, 16, 24, generator=g))
    assert main(["train", "--data", str(root / "clean"), "--tasks", "noise", "--batch", "1", "--patch", "16",
                 "--out", str(root / "run"), "--steps", "1", "--eval-every", "0"]) == 0
    return root


def test_user_mistakes_end_in_one_line_and_status_1(tmp_path, capsys, trained):
    checkpoint, clean = str(trained / "run" / "checkpoint.pt"), trained / "clean"
    restore = ["restore", "--checkpoint", checkpoint, "--out", str(tmp_path / "out")]
    train_in = ["train", "--data", str(clean), "--tasks", "noise", "--batch", "1", "--patch", "16", "--steps", "2"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "random.pt").write_bytes(torch.randint(256, (4096,), dtype=torch.uint8).numpy().tobytes())
    flipped = bytearray((trained / "run" / "checkpoint.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    for folder in ("a", "b"):
        write_image(tmp_path / folder / "x.png", torch.rand(3, 16, 16))
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "missing.pt")], "does not exist"),
        (["eval", "--checkpoint", str(tmp_path / "random.pt")], "not a moe-restore checkpoint"),
        (["eval", "--checkpoint", str(tmp_path / "flipped.pt"), "--data", str(clean)], "corrupt"),
        ([*restore, str(clean / "photo0.png"), "--checkpoint", str(tmp_path / "plain.pt")], "not a moe-restore"),
        ([*restore, str(tmp_path / "text.png")], "cannot read image"),
        ([*restore, str(tmp_path / "nothing.png")], "does not exist"),
        ([*restore, str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")], "would both be written"),
        ([*restore, str(clean / "photo0.png"), "--out", str(clean)], "overwrite an input"),
        ([*restore, str(clean / "photo0.png"), "--tile", "16", "--overlap", "16"], "--overlap"),
        ([*train_in, "--out", str(tmp_path / "fresh"), "--resume"], "no checkpoint"),
        ([*train_in, "--out", str(trained / "run")], "in use"),
        ([*train_in, "--out", str(trained / "run"), "--resume", "--model", "mim-dit-tiny"], "model"),
        ([*train_in, "--out", str(tmp_path / "r1"), "--data", str(tmp_path / "empty")], "no images"),
        ([*train_in, "--out", str(tmp_path / "r2"), "--data", str(tmp_path / "none")], "existing folder"),
        ([*train_in, "--out", str(tmp_path / "r3"), "--patch", "32"], "larger than"),
        ([*train_in, "--out", str(tmp_path / "r4"), "--model", "m2ir-huge"], "unknown model"),
    ]
    for argv, problem in cases:
        assert problem in _refused(capsys, argv, 1), argv
    assert not (tmp_path / "out").exists(), "a refused restore wrote an output"
    assert load_checkpoint(trained / "run" / "checkpoint.pt")["step"] == 1, "a refused run touched the folder"


def test_faults_that_used_to_end_in_a_traceback_are_one_line(tmp_path, capsys, trained, monkeypatch):
    """A checkpoint with NaN weights or a configuration of another version, --backend triton where
    Triton cannot run, a corrupt results file for --plot, a resume with nothing left to train."""
    state = load_checkpoint(trained / "run" / "checkpoint.pt")
    model = build(state["config"]["model"], **state["config"]["model_config"])
    model.load_state_dict(state["model"])
    next(model.parameters()).data[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model=model, config=state["config"])
    unknown = {**state["config"], "model_config": {**state["config"]["model_config"], "bogus": 3}}
    save_checkpoint(tmp_path / "unknown.pt", model=model, config=unknown)
    (tmp_path / "corrupt.json").write_text('{"rows": [')
    (tmp_path / "other.json").write_text('{"rows": []}')
    clean = str(trained / "clean")
    evaluate = ["eval", "--data", clean, "--out", str(tmp_path / "eval"), "--checkpoint"]
    cases = [
        ([*evaluate, str(tmp_path / "nan.pt")], "NaN or infinite weights"),
        ([*evaluate, str(tmp_path / "unknown.pt")], "does not fit this version"),
        (["bench", "--plot", str(tmp_path / "corrupt.json")], "not valid JSON"),
        (["bench", "--plot", str(tmp_path / "other.json")], "not a benchmark's results"),
        (["train", "--data", clean, "--tasks", "noise", "--batch", "1", "--patch", "16", "--out",
          str(trained / "run"), "--steps", "1", "--resume"], "nothing to train"),
    ]
    for argv, problem in cases:
        assert problem in _refused(capsys, argv, 1), argv
    from moe_restore.kernels import settings

    monkeypatch.setattr(settings, "INTERPRET", False)  # a CPU without the interpreter: Triton cannot run
    argv = ["train", "--data", clean, "--batch", "1", "--patch", "16", "--out", str(tmp_path / "r"), "--steps", "1",
            "--device", "cpu", "--backend", "triton"]
    assert "--backend triton on cpu" in _refused(capsys, argv, 1)
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path, capsys, trained):
    state = load_checkpoint(trained / "run" / "checkpoint.pt")
    config = {**state["config"], "model": "mim-dit-tiny",
              "model_config": {"num_classes": 1, "hidden": 32, "depth": 1, "heads": 2}}
    save_checkpoint(tmp_path / "other.pt", model=build("m2ir-tiny", num_classes=1), config=config)
    err = _refused(capsys, ["eval", "--checkpoint", str(tmp_path / "other.pt"), "--data", str(trained / "clean")], 1)
    assert "do not fit a mim-dit-tiny" in err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch, capsys, trained):
    missing = ["eval", "--checkpoint", str(tmp_path / "missing.pt")]
    with pytest.raises(UserError, match="does not exist"):
        main(["--debug", *missing])
    monkeypatch.setenv("MOE_RESTORE_DEBUG", "1")
    with pytest.raises(UserError, match="does not exist"):
        main(missing)
    monkeypatch.delenv("MOE_RESTORE_DEBUG")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("moe_restore.train.inference.restore_image", broken)
    with pytest.raises(ZeroDivisionError):
        main(["restore", "--checkpoint", str(trained / "run" / "checkpoint.pt"), str(trained / "clean" / "photo0.png"),
              "--out", str(tmp_path / "o")])


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

"""Training loop: bit-exact resume after a crash, atomic checkpoints, configuration checks,
tiled inference, and DistributedDataParallel with gloo and 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from moe_restore.data import FixedDegradedDataset, write_image
from moe_restore.train import TrainConfig, restore_image, train
from moe_restore.errors import UserError
from moe_restore.train.checkpoint import load_checkpoint, save_checkpoint
from moe_restore.models import build
from moe_restore.train.demo import (
    DEMO_BATCH,
    DEMO_PATCH,
    DEMO_STEPS,
    ChannelOrderAverage,
    before_after_grid,
    demo_config,
    write_demo_outputs,
)
from moe_restore.train import demo
from moe_restore.train.inference import load_model


def _config(out: Path, **changes) -> TrainConfig:
    settings = dict(model="m2ir-tiny", data="builtin", tasks=("noise", "lowlight+haze"), steps=3, batch=2, patch=16,
                    lr=1e-3, warmup=2, eval_every=0, checkpoint_every=2, out=str(out), backend="torch")
    return TrainConfig(**{**settings, **changes})


class _Crash(Exception):
    pass


def test_resume_after_a_crash_repeats_the_uninterrupted_run(tmp_path):
    straight: dict[int, float] = {}
    reference = train(_config(tmp_path / "a"), progress=False, on_step=lambda s, t: straight.__setitem__(s, t["total"]))

    def crash_at_step_3(step, terms):
        if step == 3:
            raise _Crash  # after step 3's update, before its checkpoint: step 2's is on disk

    with pytest.raises(_Crash):
        train(_config(tmp_path / "b"), progress=False, on_step=crash_at_step_3)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    resumed: dict[int, float] = {}
    model = train(_config(tmp_path / "b"), resume=True, progress=False,
                  on_step=lambda s, t: resumed.__setitem__(s, t["total"]))
    assert list(resumed) == [3] and resumed[3] == straight[3]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [p for p in (tmp_path / "b").iterdir() if p.suffix == ".tmp"], "a temporary checkpoint was left"
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["tasks"] == ["noise", "lowlight+haze"]


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict/list (a state dict), by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_mim_dit_resume_after_a_crash_repeats_the_uninterrupted_run(tmp_path):
    """MiM-DiT draws noise and times in its loss: a run killed after step 3 of 4 (its checkpoint
    is step 2's, its log holds steps 1-3) and resumed ends with the uninterrupted run's every
    model, optimizer and generator tensor, bit for bit, and a log of each step once."""
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_image(tmp_path / "clean" / f"photo{i}.png", torch.rand(3, 24, 32, generator=g))
    # The evaluation at step 2 samples (from the global RNG) after step 2's checkpoint was written.
    tiny = dict(model="mim-dit-tiny", model_overrides={"hidden": 32, "depth": 1, "heads": 2, "sample_steps": 1},
                steps=4, eval_every=2, data=str(tmp_path / "clean"))
    run_a, run_b = _config(tmp_path / "a", **tiny), _config(tmp_path / "b", **tiny)
    train(run_a, progress=False)

    def crash_at_step_4(step, terms):
        if step == 4:
            raise _Crash  # steps 1-3 logged, step 2's checkpoint on disk

    with pytest.raises(_Crash):
        train(run_b, progress=False, on_step=crash_at_step_4)
    assert _logged_steps(tmp_path / "b") == [1, 2, 3]
    train(run_b, resume=True, progress=False)
    assert _logged_steps(tmp_path / "b") == [1, 2, 3, 4]
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("a", "b"))
    assert a["step"] == b["step"] == 4
    tensors_a = _tensors({k: a[k] for k in ("model", "optimizer", "generators")})
    tensors_b = _tensors({k: b[k] for k in ("model", "optimizer", "generators")})
    assert tensors_a.keys() == tensors_b.keys() and len(tensors_a) > 50
    differing = [name for name in tensors_a if not torch.equal(tensors_a[name], tensors_b[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_checkpoint_checksum_detects_a_flipped_byte_and_orphans_are_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model = torch.nn.Linear(64, 64)
    save_checkpoint(path, model=model, step=7)
    assert load_checkpoint(path)["step"] == 7
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a moe-restore checkpoint"):
        load_checkpoint(path)
    # A save killed between creating its temporary file and the rename leaves this behind.
    orphan = tmp_path / ".checkpoint.pt.k1ll3d.tmp"
    orphan.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.x.tmp"
    other.write_bytes(b"another checkpoint's")
    save_checkpoint(path, model=model, step=8)
    assert not orphan.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.x.tmp", "checkpoint.pt"]
    state = load_checkpoint(path)
    assert state["step"] == 8 and torch.equal(state["model"]["weight"], model.weight.detach())


def test_a_run_folder_in_use_needs_resume_or_overwrite(tmp_path):
    train(_config(tmp_path, steps=1), progress=False)
    with pytest.raises(UserError, match="in use"):
        train(_config(tmp_path, steps=1), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    train(_config(tmp_path, steps=2, checkpoint_every=0), overwrite=True, progress=False)
    assert _logged_steps(tmp_path) == [1, 2]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_overwrite_keeps_the_earlier_run_until_its_first_checkpoint(tmp_path):
    """--overwrite deletes nothing before the new run has read its data, and the earlier
    checkpoint and log stay whole until the new run's first checkpoint has replaced them."""
    train(_config(tmp_path, steps=2, checkpoint_every=0), progress=False)
    earlier = (tmp_path / "checkpoint.pt").read_bytes()
    empty = tmp_path.parent / f"{tmp_path.name}-no-images"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        train(_config(tmp_path, data=str(empty)), overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == earlier and _logged_steps(tmp_path) == [1, 2]

    def crash_at_step_2(step, terms):
        assert (tmp_path / "checkpoint.pt").read_bytes() == earlier and _logged_steps(tmp_path) == [1, 2]
        if step == 2:
            raise _Crash
    with pytest.raises(_Crash):
        train(_config(tmp_path, steps=3, checkpoint_every=3), overwrite=True, progress=False,
              on_step=crash_at_step_2)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2 and _logged_steps(tmp_path) == [1, 2]
    train(_config(tmp_path, steps=3, checkpoint_every=2), overwrite=True, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3 and _logged_steps(tmp_path) == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]


def test_resume_past_the_last_step_says_so(tmp_path, capsys):
    train(_config(tmp_path, steps=2), progress=False)
    with pytest.raises(UserError, match="at step 2, already at or past --steps 2"):
        train(_config(tmp_path, steps=2), resume=True, progress=False)
    train(_config(tmp_path, steps=3), resume=True)
    out = capsys.readouterr().out
    assert "train m2ir-tiny" in out and "resumed from step 2" in out and "1 step(s) to go" in out


def test_a_model_worse_than_its_input_is_reported(tmp_path, capsys):
    """One step of a fresh model restores worse than the identity: a warning on stderr, and a
    UserError under strict after the checkpoint and evaluation were written."""
    config = _config(tmp_path, steps=1, eval_every=1)
    train(config, progress=False)
    assert "warning: the trained model restores worse than its input" in capsys.readouterr().err
    with pytest.raises(UserError, match="worse than its input"):
        train(config, overwrite=True, progress=False, strict=True)
    assert (tmp_path / "eval_step1.json").is_file() and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_resume_refuses_a_different_run(tmp_path):
    train(_config(tmp_path, steps=1), progress=False)
    with pytest.raises(ValueError, match="patch"):
        train(_config(tmp_path, steps=2, patch=24), resume=True, progress=False)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(_config(tmp_path / "empty"), resume=True, progress=False)
    with pytest.raises(ValueError, match="patch"):
        _config(tmp_path, patch=20)
    with pytest.raises(ValueError, match="steps"):
        _config(tmp_path, steps=0)


class _Saved:
    """A saved state as save_checkpoint takes it (an object with ``state_dict``)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def test_resume_refuses_a_checkpoint_with_shared_expert_banks(tmp_path):
    """M2IR's ADEC has a shared expert: written as a bank of one expert MLP (the layout before
    DenseMLP), its weights convert for eval, but the run cannot resume (the optimizer's moments
    have the old shapes): a clear refusal, not a size mismatch."""
    train(_config(tmp_path, steps=2), progress=False)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    banks = {k: v.unsqueeze(0) if ".shared_expert." in k else v for k, v in state["model"].items()}
    assert sum(".shared_expert." in k for k in banks) >= 2
    save_checkpoint(path, model=_Saved(banks), optimizer=_Saved(state["optimizer"]),
                    scheduler=_Saved(state["scheduler"]), step=state["step"], config=state["config"])
    with pytest.raises(UserError, match="bank of expert MLPs"):
        train(_config(tmp_path, steps=3), resume=True, progress=False)
    model = load_model(path)[0]
    assert all(torch.equal(p, state["model"][n]) for n, p in model.state_dict().items())


def test_tiled_restoration_blends_to_the_untiled_result():
    """A pointwise network gives the same output tiled or not: the blend weights sum to one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Sigmoid())
    image = torch.rand(3, 70, 93)
    whole = restore_image(model, image, tile=None)
    for tile, overlap in ((32, 8), (40, 0), (64, 31)):
        assert torch.allclose(restore_image(model, image, tile=tile, overlap=overlap), whole, atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        restore_image(model, image, tile=16, overlap=16)


def test_before_after_grid_layout():
    """A header row, then one row per (task, image) of cells of one size: degraded, restored,
    clean (the images, fitted to the cell), each row with its PSNR captions drawn in."""
    images = [torch.rand(3, 40, 60), torch.rand(3, 50, 50), torch.rand(3, 30, 90)]
    dataset = FixedDegradedDataset(images, ("noise", "blur"))
    grid = before_after_grid(torch.nn.Identity(), dataset)
    box_h, box_w = demo._BOX
    assert grid.shape == (3, demo._TEXT + 6 * (box_h + demo._TEXT), demo._LABEL_WIDTH + 3 * box_w)
    top = demo._TEXT + 2 * (box_h + demo._TEXT)  # the third row: noise, third image (30 x 90)
    clean = grid[:, top:top + box_h, demo._LABEL_WIDTH + 2 * box_w:]
    assert torch.allclose(clean, demo._fit(images[2]), atol=1 / 255)
    caption = grid[:, top + box_h:top + box_h + demo._TEXT, demo._LABEL_WIDTH:demo._LABEL_WIDTH + box_w]
    assert (caption < 0.5).any(), "no PSNR caption under the degraded image"


def test_channel_order_average_favours_no_channel():
    """The demo's restorer on a 1x1 colour map M (per pixel y = M x + b) is the map whose entry
    (i, j) is the mean of M[i+k, j+k] over the cyclic shifts k (indices mod 3), and b becomes its
    mean; on an M2IR whose output head and input filter are random (not the identity it starts
    as) a grey image comes back with three equal channels, which the network alone does not give."""
    torch.manual_seed(0)
    linear = torch.nn.Conv2d(3, 3, 1)
    m, b = linear.weight[:, :, 0, 0].detach(), linear.bias.detach()
    expected = torch.tensor([[sum(float(m[(i + k) % 3, (j + k) % 3]) for k in range(3)) / 3 for j in range(3)]
                             for i in range(3)])
    x = torch.rand(2, 3, 5, 7)
    with torch.no_grad():
        got = ChannelOrderAverage(linear)(x)
    want = torch.einsum("ij,bjhw->bihw", expected, x) + b.mean()
    assert torch.allclose(got, want, atol=1e-6)

    network = build("m2ir-tiny", backend="torch").eval()
    for weight in (network.output.weight, network.input_filter.weight):
        torch.nn.init.normal_(weight, std=0.05)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32).contiguous()
    with torch.no_grad():
        plain, averaged = network(grey), ChannelOrderAverage(network)(grey)
    assert (plain - plain.mean(1, keepdim=True)).abs().max() > 1e-3
    assert (averaged - averaged.mean(1, keepdim=True)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="shape"):
        ChannelOrderAverage(linear)(x[0])


def test_demo_outputs_cover_every_held_out_image(tmp_path):
    """The demo's evaluation scores each task on all built-in held-out images (at least three) and
    writes the results and a grid of one row per image; the identity restorer scores as its input."""
    results = write_demo_outputs(torch.nn.Identity(), ("noise",), tmp_path)
    row = results["tasks"]["noise"]
    assert row["count"] >= 3 and row["model"]["psnr"] == pytest.approx(row["identity"]["psnr"])
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["noise"]["count"] == row["count"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height == demo._TEXT + row["count"] * (demo._BOX[0] + demo._TEXT)


def test_each_model_gets_its_own_demo_run_and_the_mim_dit_sampling_reaches_restore(tmp_path):
    m2ir = demo_config(tmp_path, model="m2ir-tiny")
    assert (m2ir.steps, m2ir.batch, m2ir.patch) == (DEMO_STEPS, DEMO_BATCH, DEMO_PATCH) and m2ir.loss.relative
    mim = demo_config(tmp_path, model="mim-dit-tiny", steps=1)
    assert mim.steps == mim.checkpoint_every == 1
    assert demo_config(tmp_path, model="mim-dit-tiny").steps > DEMO_STEPS
    # Rectified flow reads neither term: the recorded run must not claim them.
    assert mim.loss.fft == 0 and not mim.loss.relative
    with pytest.raises(ValueError, match="no demo"):
        demo_config(tmp_path, model="mim-dit-s")

    # The demo's sampling steps are part of the trained model, so the demo's evaluation and a later
    # `moe-restore eval` of its checkpoint sample alike: count the network's forwards per image.
    trained = train(mim, progress=False)
    reloaded, _ = load_model(tmp_path / "run" / "checkpoint.pt")
    for model in (trained, reloaded):
        calls: list[int] = []
        model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        restore_image(model.eval(), torch.rand(3, 24, 24))
        assert len(calls) == mim.model_overrides["sample_steps"]


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from moe_restore.train import TrainConfig, train
    out = sys.argv[1]
    model = train(TrainConfig(model="m2ir-tiny", data="builtin", tasks=("noise", "haze"), steps=2, batch=1,
                              patch=16, warmup=1, eval_every=0, checkpoint_every=2, out=out, backend="torch"),
                  progress=False)
    torch.save(model.state_dict(), os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
""")


def test_ddp_gloo_two_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    initial = load_checkpoint(tmp_path / "checkpoint.pt")
    assert initial["step"] == 2
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    torch.manual_seed(0)
    from moe_restore.models import build

    fresh = build("m2ir-tiny", num_classes=2).state_dict()
    assert any(not torch.equal(fresh[n], rank0[n]) for n in rank0), "training changed nothing"

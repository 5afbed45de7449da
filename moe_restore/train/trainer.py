"""The training loop of the all-in-one restorers.

Step s of a run trains on the global batch of dataset items [s * B * W, (s + 1) * B * W) (B the
per-process batch, W the number of processes; rank r takes its B consecutive items). Dataset
items are pure functions of their index, so together with the checkpointed model, optimizer,
scheduler and RNG states a resumed run repeats an uninterrupted one bit for bit.

Per step: the network's objective (``training_objective``: for M2IR Charbonnier + FFT + load balance +
degradation classification, weights in the configuration, see ``losses``; for MiM-DiT its
rectified-flow loss), AdamW, gradient clipping at ``clip_norm``, linear warm-up then
cosine decay of the learning rate to ``min_lr_ratio`` of its peak. On CUDA the forward runs under
bfloat16 autocast (``amp``) and the ops use the Triton kernels; on the CPU, float32 and the torch
backend.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from moe_restore.data.datasets import check_tasks
from moe_restore.data.sources import evaluation_set, training_set
from moe_restore.errors import UserError
from moe_restore.layers.experts import shared_banks_to_dense
from moe_restore.train import distributed
from moe_restore.train.checkpoint import load_checkpoint, save_checkpoint, set_generator_states, set_rng_state
from moe_restore.train.evaluate import evaluate, markdown_table, tasks_not_beating_identity, write_results
from moe_restore.train.inference import pipeline_backend
from moe_restore.losses import LossWeights
from moe_restore.train.training_objective import TrainingObjective

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
# The log of a run that replaces another (--overwrite) until its first checkpoint is written.
PENDING_LOG_NAME = ".log.jsonl.pending"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in its checkpoints)."""

    model: str = "m2ir-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "builtin"
    tasks: tuple[str, ...] = ("noise", "rain", "haze", "blur", "lowlight")
    steps: int = 1000
    batch: int = 8
    patch: int = 64
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 50
    min_lr_ratio: float = 0.05
    clip_norm: float = 1.0
    loss: LossWeights = field(default_factory=LossWeights)
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0
    out: str = "runs/m2ir"
    amp: bool = True
    backend: str | None = None
    device: str | None = None
    workers: int = 0

    def __post_init__(self):
        self.tasks = check_tasks(self.tasks)
        for name in ("steps", "batch", "patch", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "every" in name else 1):
                raise UserError(f"{name} must be a {'non-negative' if 'every' in name else 'positive'} int, got {value!r}")
        if self.patch % 8:
            raise UserError(f"patch must be a multiple of 8, got {self.patch}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings that may change on resume (a longer run, another schedule of evaluations, ...).
_RESUMABLE = {"steps", "eval_every", "checkpoint_every", "out", "device", "workers", "backend"}


def _build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    from moe_restore.models import build

    return build(config.model, **{"num_classes": len(config.tasks), **config.model_overrides,
                                  "backend": pipeline_backend(config.backend, device)})


def _lr_factor(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
    return factor


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    degraded, clean, labels = zip(*items)
    return torch.stack(degraded), torch.stack(clean), torch.tensor(labels, dtype=torch.int64)


def _run_config(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    return {"train": config.to_dict(), "model": config.model,
            "model_config": {k: v for k, v in model.config.to_dict().items() if k != "backend"},
            "tasks": list(config.tasks)}


def _resume_state(config: TrainConfig, path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    saved = state["config"]["train"]
    changed = sorted(k for k, v in config.to_dict().items() if k not in _RESUMABLE and saved.get(k) != v)
    if changed:
        raise UserError(f"cannot resume {path}: the run was started with other {changed} "
                         f"({ {k: saved.get(k) for k in changed} })")
    return state


def _check_shared_expert_layout(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint whose shared experts are stored as a bank of expert MLPs (the
    layout before ``DenseMLP``): its weights convert (``shared_banks_to_dense``, as eval and
    restore do), but its optimizer state holds moments of the old shapes, which do not."""
    converted = shared_banks_to_dense(model, state)
    old = sorted(key for key, value in converted.items() if value is not state[key])
    if old:
        raise UserError(f"cannot resume {path}: it stores its shared experts as a bank of expert MLPs ({old[0]}, "
                        "the layout before they became one dense MLP), and its optimizer state has those shapes. "
                        "Its weights still load for `moe-restore eval` and `restore`; start a new run to train")


def _claim_run_folder(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to start a new run in a folder that holds another run's checkpoint or log, unless
    ``overwrite``; with ``resume`` the folder must hold a checkpoint. Deletes nothing: returns
    whether a new run replaces an earlier one, whose files then stay until the new run has written
    its first complete checkpoint (``_hand_over``)."""
    checkpoint, log = out / CHECKPOINT_NAME, out / LOG_NAME
    if resume:
        if not checkpoint.is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint}")
        return False
    in_use = [p.name for p in (checkpoint, log) if p.is_file()]
    if in_use and not overwrite:
        raise UserError(f"run folder {str(out)!r} is in use (it holds {', '.join(in_use)}): pass --resume to "
                        "continue that run or --overwrite to start a new one in its place")
    return bool(in_use)


def _hand_over(out: Path, written_evaluations: set[str]) -> None:
    """Make a replacing run's files the folder's own, once its first checkpoint has replaced the
    earlier run's (atomically, in ``save_checkpoint``): its log takes the place of the earlier log
    and the earlier run's evaluations that this run has not rewritten are removed."""
    for stale in out.glob("eval_step*.*"):
        if stale.name not in written_evaluations:
            stale.unlink()
    (out / PENDING_LOG_NAME).replace(out / LOG_NAME)


def _open_log(path: Path, start: int):
    """The step log opened for appending after step ``start``: the lines of later steps (written
    after the checkpoint the run resumes from, which it is about to replay) and a line cut short
    by a kill are dropped first, so that the log holds each step once."""
    kept = []
    if start and path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if line.endswith("\n") and entry.get("step", start + 1) <= start:
                kept.append(line)
    path.write_text("".join(kept))
    return path.open("a")


def _describe(config: TrainConfig, model: nn.Module, env, backend: str | None, amp: bool) -> str:
    """The run's set-up in two lines, printed at its start."""
    parameters = sum(p.numel() for p in model.parameters())
    return (f"train {config.model} ({parameters / 1e6:.3f} M parameters) on {config.data!r}, tasks "
            f"{', '.join(config.tasks)}: {config.steps} steps of {config.batch} x {config.patch}px patches x "
            f"{env.world_size} process(es)\n  lr {config.lr:g}, seed {config.seed}, device {env.device}, backend "
            f"{backend or 'auto'}, bf16 autocast {'on' if amp else 'off'}, run folder {config.out}")


def _write_run_config(out: Path, run_config: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          strict: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Train (or resume) the run described by ``config``; returns the trained model (unwrapped).

    Writes ``<out>/checkpoint.pt`` every ``checkpoint_every`` steps (0: only) at the end,
    ``<out>/log.jsonl`` (one line per step) and ``<out>/eval_step<N>.{json,md}`` every
    ``eval_every`` steps and at the end (process 0 only). ``on_step(step, terms)`` is called after
    each step with the loss terms. A folder holding another run is refused (``UserError``) unless
    ``resume`` (continue it from its checkpoint) or ``overwrite`` (start over in its place). Nothing
    of the earlier run is lost before the new one has read its data and written its first complete
    checkpoint (write, fsync, rename over the earlier one); until then the new run logs to
    ``.log.jsonl.pending``, and at that checkpoint its log replaces the earlier log and the earlier
    evaluations it has not rewritten are removed. A resume from a checkpoint already at or past
    ``steps`` would train nothing: ``UserError``.

    With ``progress`` (process 0) the set-up, the step the run resumed from and a progress bar are
    printed. When the final evaluation finds the model no better than its input (the identity) in
    PSNR on some task, that is reported on stderr, or raised as ``UserError`` with ``strict`` (after
    the checkpoint and the evaluation have been written).

    Every random draw of a step comes from checkpointed state: the data items are functions of
    their index, and the objective (MiM-DiT's noise and times) draws from its own generator, seeded
    from ``seed`` and the process rank and saved in the checkpoints.
    """
    env = distributed.setup(config.device)
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    torch.manual_seed(config.seed)
    backend = pipeline_backend(config.backend, env.device)
    model = _build_model(config, env.device).to(env.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    # One stream per process (seed s, rank r never meets seed s + 1, rank r - 1 for r < 1_000_003).
    objective_generator = torch.Generator(env.device).manual_seed((config.seed * 1_000_003 + env.rank) % 2**63)
    generators = {"objective": objective_generator}
    # The data before the run folder: a run that cannot read its data stops before it touches it.
    per_step = config.batch * env.world_size
    dataset = training_set(config.data, config.tasks, patch=config.patch, length=config.steps * per_step,
                           seed=config.seed)
    # eval_every = 0: no periodic evaluation (and none at the end either).
    eval_set = evaluation_set(config.data, config.tasks) if env.is_main and config.eval_every else None
    start = 0
    replacing = _claim_run_folder(out, resume=resume, overwrite=overwrite) if env.is_main else False
    distributed.barrier(env)
    if resume:
        state = _resume_state(config, checkpoint_path)
        start = state["step"]
        if start >= config.steps:
            raise UserError(f"--resume: the checkpoint {checkpoint_path} is at step {start}, already at or past "
                            f"--steps {config.steps}, so there is nothing to train; pass --steps greater than {start}")
        _check_shared_expert_layout(model, state["model"], checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        set_generator_states(state, generators)

    batches = [list(range(s * per_step + env.rank * config.batch, s * per_step + (env.rank + 1) * config.batch))
               for s in range(start, config.steps)]
    # The loader's own generator: its iterator draws the workers' base seed from it, not from the
    # global RNG (whose restored state the step must find untouched).
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_collate, num_workers=config.workers,
                        generator=torch.Generator().manual_seed(config.seed))
    objective = TrainingObjective(model, config.loss, generator=objective_generator)
    if env.enabled:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    use_amp = config.amp and env.device.type == "cuda"
    run_config = _run_config(config, model)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not replacing:
            _write_run_config(out, run_config)
    say = print if progress and env.is_main else (lambda message: None)
    say(_describe(config, model, env, backend, use_amp))
    if resume:
        say(f"resumed from step {start} of {checkpoint_path}: {config.steps - start} step(s) to go")
    elif replacing:
        say(f"replacing the run in {out}: its checkpoint and log stay until this run's first checkpoint")

    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train {config.model}", unit="step")
    log = _open_log(out / (PENDING_LOG_NAME if replacing else LOG_NAME), start) if env.is_main else None
    evaluations: set[str] = set()  # the evaluation files this run has written
    results = None
    model.train()
    tick = time.perf_counter()
    for step, (degraded, clean, labels) in enumerate(loader, start=start + 1):
        degraded, clean, labels = (t.to(env.device, non_blocking=True) for t in (degraded, clean, labels))
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
            total, terms = objective(degraded, clean, labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        scheduler.step()
        terms["total"] = float(total.detach())
        if on_step is not None:
            on_step(step, terms)
        if env.is_main:
            now = time.perf_counter()
            images_per_second = per_step / max(now - tick, 1e-9)
            tick = now
            log.write(json.dumps({"step": step, **terms, "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{terms['total']:.4f}", img_s=f"{images_per_second:.1f}")
                bar.update(1)
        final = step == config.steps
        if env.is_main and (final or config.checkpoint_every and step % config.checkpoint_every == 0):
            save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            config=run_config, generators=generators)
            if replacing:
                log.close()
                _hand_over(out, evaluations)
                _write_run_config(out, run_config)
                log = (out / LOG_NAME).open("a")
                replacing = False
        if eval_set is not None and (final or step % config.eval_every == 0):
            results = evaluate(model, eval_set)
            evaluations.update(path.name for path in write_results(results, out, stem=f"eval_step{step}"))
            message = f"step {step}: evaluation on held-out images\n" + markdown_table(results)
            (bar.write if bar is not None else print)(message)
        distributed.barrier(env)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    distributed.teardown(env)
    behind = tasks_not_beating_identity(results) if results is not None else []
    if behind:
        message = (f"the trained model restores worse than its input (PSNR at most the identity's) on: "
                   f"{', '.join(behind)}; train longer or change the settings (see {out}/eval_step{config.steps}.md)")
        if strict:
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)
    return model

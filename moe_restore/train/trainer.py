"""The training loop of the all-in-one restorers.

Step s of a run trains on the global batch of dataset items [s * B * W, (s + 1) * B * W) (B the
per-process batch, W the number of processes; rank r takes its B consecutive items). Dataset
items are pure functions of their index, so together with the checkpointed model, optimizer,
scheduler and RNG states a resumed run repeats an uninterrupted one bit for bit.

Per step: the network's objective (``objective``: for M2IR Charbonnier + FFT + load balance +
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
from moe_restore.train import distributed
from moe_restore.train.checkpoint import load_checkpoint, save_checkpoint, set_generator_states, set_rng_state
from moe_restore.train.evaluate import evaluate, markdown_table, write_results
from moe_restore.train.inference import pipeline_backend
from moe_restore.train.losses import LossWeights
from moe_restore.train.objective import TrainingObjective

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


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


def _claim_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another run's checkpoint or log, unless
    ``overwrite`` (which deletes them); with ``resume`` the folder must hold a checkpoint."""
    checkpoint, log = out / CHECKPOINT_NAME, out / LOG_NAME
    if resume:
        if not checkpoint.is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint}")
        return
    in_use = [p.name for p in (checkpoint, log) if p.is_file()]
    if in_use and not overwrite:
        raise UserError(f"run folder {str(out)!r} is in use (it holds {', '.join(in_use)}): pass --resume to "
                        "continue that run or --overwrite to start a new one in its place")
    for name in in_use:
        (out / name).unlink()


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


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Train (or resume) the run described by ``config``; returns the trained model (unwrapped).

    Writes ``<out>/checkpoint.pt`` every ``checkpoint_every`` steps (0: only) at the end,
    ``<out>/log.jsonl`` (one line per step) and ``<out>/eval_step<N>.{json,md}`` every
    ``eval_every`` steps and at the end (process 0 only). ``on_step(step, terms)`` is called after
    each step with the loss terms. A folder holding another run is refused (``UserError``) unless
    ``resume`` (continue it from its checkpoint) or ``overwrite`` (start over in its place).

    Every random draw of a step comes from checkpointed state: the data items are functions of
    their index, and the objective (MiM-DiT's noise and times) draws from its own generator, seeded
    from ``seed`` and the process rank and saved in the checkpoints.
    """
    env = distributed.setup(config.device)
    out = Path(config.out)
    checkpoint_path = out / CHECKPOINT_NAME
    torch.manual_seed(config.seed)
    model = _build_model(config, env.device).to(env.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    # One stream per process (seed s, rank r never meets seed s + 1, rank r - 1 for r < 1_000_003).
    objective_generator = torch.Generator(env.device).manual_seed((config.seed * 1_000_003 + env.rank) % 2**63)
    generators = {"objective": objective_generator}
    start = 0
    if env.is_main:
        _claim_run_folder(out, resume=resume, overwrite=overwrite)
    distributed.barrier(env)
    if resume:
        state = _resume_state(config, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        set_rng_state(state["rng"])
        set_generator_states(state, generators)

    per_step = config.batch * env.world_size
    dataset = training_set(config.data, config.tasks, patch=config.patch, length=config.steps * per_step,
                           seed=config.seed)
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
        (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    # eval_every = 0: no periodic evaluation (and none at the end either).
    eval_set = evaluation_set(config.data, config.tasks) if env.is_main and config.eval_every else None

    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train {config.model}", unit="step")
    log = _open_log(out / LOG_NAME, start) if env.is_main else None
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
        if eval_set is not None and (final or step % config.eval_every == 0):
            results = evaluate(model, eval_set)
            write_results(results, out, stem=f"eval_step{step}")
            message = f"step {step}: evaluation on held-out images\n" + markdown_table(results)
            (bar.write if bar is not None else print)(message)
        distributed.barrier(env)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    distributed.teardown(env)
    return model

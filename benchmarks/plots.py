"""PNG charts of a benchmark's JSON results, written beside it (matplotlib: ``pip install
moe-restore[plot]``; without it the charts are skipped with a note).

    <results>-speed.png   forward + backward time per implementation and shape (ms; on the CPU
                          wall time from one interleaved run: compare bars within a shape only)
    <results>-saved.png   bytes kept for backward per token, per implementation and shape (log scale)
    <results>-skew.png    forward + backward time against the skew of the routing (moe suite)

``moe-restore bench --plot RESULTS.json`` redraws them from saved results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TIME_KEYS = ("fwd_bwd_ms", "fwd_ms")  # layer suites time forward + backward; the scan suite its forward


def _grouped_bars(ax, rows: list[dict[str, Any]], key: str) -> bool:
    """One group of bars per shape, one bar per implementation; False if no row has ``key``."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        values = {r["shape"]: r[key] for r in rows if r["implementation"] == impl}
        xs = [s + (i - (len(impls) - 1) / 2) * width for s in range(len(shapes)) if shapes[s] in values]
        ax.bar(xs, [values[s] for s in shapes if s in values], width, label=impl)
    ax.set_xticks(range(len(shapes)), shapes, rotation=15, ha="right", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return True


def load_results(path: Path) -> dict[str, Any]:
    """The results JSON at ``path``, checked for what the charts read; ``UserError`` (one line on
    the command line) for a file that is not JSON or not a benchmark's results."""
    from moe_restore.errors import UserError

    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); pass a results file that moe-restore bench wrote") \
            from None
    environment, rows = (data.get("environment"), data.get("rows")) if isinstance(data, dict) else (None, None)
    if not (isinstance(environment, dict) and "device" in environment and isinstance(rows, list)
            and all(isinstance(r, dict) and {"shape", "implementation"} <= set(r) for r in rows)):
        raise UserError(f"{path} is not a benchmark's results (want 'environment' with 'device' and 'rows', each "
                        "with 'shape' and 'implementation'); pass a results file that moe-restore bench wrote")
    return data


def write_plots(results: str | Path) -> list[Path]:
    """Draw the charts of a results JSON file beside it; return the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install 'moe-restore[plot]')")
        return []
    results = Path(results)
    data = load_results(results)
    device = data["environment"]["device"]
    rows = [r for r in data["rows"] if "skew" not in r]
    skewed = [r for r in data["rows"] if "skew" in r]
    # CPU results of this version: wall time over interleaved rounds; older ones timed fwd_bwd as
    # process time.
    timing = data["environment"].get("timing", "")
    clock = {"cpu-wall-rounds": " (CPU wall time, median of interleaved rounds)",
             "cpu-wall": " (CPU process time, interleaved)"}.get(timing, "")
    written = []

    def save(fig, suffix: str) -> None:
        path = results.with_name(f"{results.stem}-{suffix}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    key = next((k for k in TIME_KEYS if any(r.get(k) is not None for r in rows)), None)
    if key is not None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        _grouped_bars(ax, rows, key)
        ax.set_ylabel(key.replace("_ms", " ms") + clock)
        ax.set_title(f"{results.stem}: time per implementation ({device})", fontsize=9)
        save(fig, "speed")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if _grouped_bars(ax, rows, "saved_bytes_per_token"):
        ax.set_yscale("log")
        ax.set_ylabel("bytes saved for backward per token")
        ax.set_title(f"{results.stem}: memory kept for backward (device-independent count)", fontsize=9)
        save(fig, "saved")
    else:
        plt.close(fig)
    if skewed:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for impl in dict.fromkeys(r["implementation"] for r in skewed):
            points = [(r["skew"], r["fwd_bwd_ms"]) for r in skewed if r["implementation"] == impl and r["fwd_bwd_ms"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xlabel("fraction of tokens sent to expert 0 (0: the router's own spread, 1: all)")
        ax.set_ylabel("fwd_bwd ms" + clock)
        ax.set_title(f"{results.stem}: skew sweep, {skewed[0]['shape'].rsplit(' skew', 1)[0]}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "skew")
    for path in written:
        print(f"chart written to {path}")
    return written

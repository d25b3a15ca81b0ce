"""The training step log (``metrics.jsonl`` / ``metrics.csv``), the run's event log (``events.jsonl``) and the
PNG of loss, RI and LR curves.

Rank 0 keeps one row per optimizer step in memory, stores it in each checkpoint (so a resumed run's log holds each
step exactly once) and rewrites the files in the run folder (local or s3://) every few steps. Events (start,
resume from step N, finish) are appended across attempts and never rolled back: they show what happened.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from reasonembed.config.base import StorageConfig
from reasonembed.storage import Location, StorageError

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
EVENTS_JSONL = "events.jsonl"
CURVES_PNG = "curves.png"


def _dumps(row: dict[str, Any]) -> str:
    # NaN (RI statistics of a batch without reasoning queries) is not JSON: write null.
    return json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()},
                      sort_keys=True)


def to_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(_dumps(r) + "\n" for r in rows).encode()


def from_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# Column order of metrics.csv (JSON rows come back with sorted keys); unknown keys follow in order of appearance.
COLUMNS = ("step", "epoch", "domain", "loss", "loss_unweighted", "ri_active", "ri_min", "ri_max", "ri_mean",
           "ri_median", "n_without_reasoning", "lr", "grad_norm", "queries", "passages", "tokens", "truncated",
           "repeated_groups", "step_time_s", "samples_per_s", "passages_per_s", "attempt", "time")


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    present = {k for r in rows for k in r}
    cols = [c for c in COLUMNS if c in present]
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


class MetricsLog:
    """Step rows and events of one run, persisted under ``run_uri``."""

    def __init__(self, run_uri: str, storage: StorageConfig | None = None):
        self.loc = Location(run_uri, storage)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def load_checkpoint(self, folder: str | Path) -> None:
        path = Path(folder, METRICS_JSONL)
        self.rows = from_jsonl(path.read_bytes()) if path.is_file() else []

    def save_checkpoint(self, folder: str | Path) -> None:
        Path(folder, METRICS_JSONL).write_bytes(to_jsonl(self.rows))

    def flush(self) -> None:
        self.loc.write_bytes(METRICS_JSONL, to_jsonl(self.rows))
        self.loc.write_bytes(METRICS_CSV, to_csv(self.rows))

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event to events.jsonl (read-modify-write: object stores have no append)."""
        events = read_events(self.loc.uri, self.loc.cfg)
        events.append({"event": kind, **fields})
        self.loc.write_bytes(EVENTS_JSONL, to_jsonl(events))


def read_rows(run_uri: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    loc = Location(run_uri, storage)
    return from_jsonl(loc.read_bytes(METRICS_JSONL)) if loc.exists(METRICS_JSONL) else []


def read_events(run_uri: str, storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    loc = Location(run_uri, storage)
    try:
        return from_jsonl(loc.read_bytes(EVENTS_JSONL)) if loc.exists(EVENTS_JSONL) else []
    except StorageError:
        return []


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Loss (weighted and unweighted), RI min/mean/median/max and LR against the optimizer step."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]

    def col(name: str) -> list[float]:
        return [float("nan") if r.get(name) is None else float(r[name]) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, col("loss"), label="loss (RI-weighted)")
    axes[0].plot(steps, col("loss_unweighted"), label="loss (mean InfoNCE)", alpha=0.7)
    axes[0].set_title("loss")
    for name, style in (("ri_max", ":"), ("ri_mean", "-"), ("ri_median", "--"), ("ri_min", ":")):
        axes[1].plot(steps, col(name), style, label=name)
    axes[1].set_title("reasoning intensity RI = L(q) / L(q')")
    axes[2].plot(steps, col("lr"), label="lr")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

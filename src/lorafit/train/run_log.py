"""What a run leaves for people: metrics.jsonl, TensorBoard events, a loss plot, peak memory."""

from __future__ import annotations

import json
import resource
import warnings
from pathlib import Path

import torch

from lorafit import atomic


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for each line of a metrics.jsonl that holds a JSON object. The file is
    appended to live, so a kill or a full disk mid-write can leave a torn last line: lines that
    do not parse (or are not objects) are skipped, with one warning naming them."""
    rows, bad = [], []
    for number, line in enumerate(Path(path).read_text("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            bad.append(number)
    if bad:
        which = f"line {bad[0]}" if len(bad) == 1 else f"lines {', '.join(map(str, bad))}"
        warnings.warn(
            f"{path}: skipped {which}: not a JSON object (a write cut short?)", stacklevel=3
        )
    return rows


class MetricsLog:
    """Append-only JSONL (one object per line) mirrored to TensorBoard when available.

    Appending, not an atomic rewrite per row: it is a live log. A resumed run rewrites it
    atomically once, keeping the rows up to its checkpoint (and dropping a torn line)."""

    def __init__(self, out: Path, truncate_after: int | None = None, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and truncate_after is not None:
            # A resumed run rewrites history after its checkpoint: drop lines the crash left beyond it.
            kept = [
                line for line, row in _read_rows(self.path) if row.get("step", 0) <= truncate_after
            ]
            atomic.write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse is skipped with a warning."""
    return [row for _, row in _read_rows(path)]


def write_loss_plot(metrics_path: Path, png: Path) -> Path | None:
    """Training loss per step and validation loss at each evaluation, as a PNG."""
    if not Path(metrics_path).exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic.write_file(png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return png


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM: unlike ru_maxrss it does not carry a (bigger) parent's size across exec
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

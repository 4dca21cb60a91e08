"""What a run logs: metrics.csv (always), TensorBoard event files (optional), and the loss.png plot at the end."""

from __future__ import annotations

import csv
from pathlib import Path

PREFERENCE_FIELDS = ["rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                     "logps_rejected", "val_reward_accuracy", "val_reward_margin"]
"""The extra columns of a preference run (leantune.train.preference): per-step means over the step's pairs."""


def open_loggers(out_dir: Path, summary_writer_cls, resumed_at: int | None, extra_fields: tuple[str, ...] = ()):
    """metrics.csv, plus TensorBoard given its SummaryWriter class (from `require_tensorboard()`, called before any
    work); `resumed_at` (the resumed step) drops rows an earlier run logged past it; `extra_fields`: columns beside
    the standard ones (a preference run's rewards)."""
    metrics = MetricsWriter(out_dir / "metrics.csv", append=resumed_at is not None, after_step=resumed_at or 0,
                            extra_fields=extra_fields)
    if summary_writer_cls is None:
        return metrics
    first = resumed_at + 1 if resumed_at is not None else None
    return Loggers([metrics, TensorBoardWriter(summary_writer_cls, out_dir / "tensorboard", first_step=first)])


class MetricsWriter:
    FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "mem_gb", "val_loss", "val_ppl"]

    def __init__(self, path: Path, append: bool, after_step: int = 0, extra_fields: tuple[str, ...] = ()) -> None:
        new = not (append and path.exists())
        self.fields = [*self.FIELDS, *extra_fields]
        if not new:
            self._truncate(path, after_step, self.fields)
        self.f = open(path, "a" if not new else "w", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self.w.writeheader()

    @staticmethod
    def _truncate(path: Path, after_step: int, fields: list[str] | None = None) -> None:
        """Drop rows past the resumed step: a run that got further than its last checkpoint logged steps the
        resumed run repeats, and each step must appear once (TensorBoard's purge_step does the same)."""
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if all(int(r["step"]) <= after_step for r in rows):
            return
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields or MetricsWriter.FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(r for r in rows if int(r["step"]) <= after_step)
        tmp.replace(path)

    def write(self, row: dict) -> None:
        self.w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def require_tensorboard():
    """SummaryWriter, or a clear error before any training work when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--train.logger tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'leantune[tensorboard]')") from e
    return SummaryWriter


class TensorBoardWriter:
    """The CSV's scalars as TensorBoard event files, keyed by optimizer step."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
            "tokens_per_s": "train/tokens_per_s", "time_s": "train/time_s", "mem_gb": "train/mem_gb",
            "epoch": "train/epoch", "val_loss": "val/loss", "val_ppl": "val/ppl",
            **{k: f"{'val' if k.startswith('val_') else 'train'}/{k.removeprefix('val_')}" for k in PREFERENCE_FIELDS}}

    def __init__(self, summary_writer_cls, log_dir: Path, first_step: int | None) -> None:
        # purge_step: on resume TensorBoard hides events of earlier runs from first_step on (steps logged after
        # the checkpoint the run resumed from), so every step shows once, from the run that continued.
        self.writer = summary_writer_cls(log_dir=str(log_dir), purge_step=first_step)

    def write(self, row: dict) -> None:
        for key, tag in self.TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Loggers:
    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def write(self, row: dict) -> None:
        for logger in self.loggers:
            logger.write(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def plot_loss(metrics_path: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps, loss, vsteps, vloss = [], [], [], []
    with open(metrics_path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("loss"):
                steps.append(int(r["step"]))
                loss.append(float(r["loss"]))
            if r.get("val_loss"):
                vsteps.append(int(r["step"]))
                vloss.append(float(r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, label="train loss")
    if vloss:
        ax.plot(vsteps, vloss, "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)

"""What a user watches during training: TensorBoard scalars, a metrics log and PNG figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import viz
from ..atomic import write_text

LN2 = math.log(2.0)


def to_bits(nats: float) -> float:
    return nats / LN2


class Reporter:
    """Rank-0 sink for scalars (TensorBoard + ``metrics.jsonl``) and figures."""

    def __init__(self, output_dir: Path, enabled: bool, purge_step: int | None = None):
        """``purge_step``: on resume, TensorBoard hides events logged at or after this step by the
        interrupted run (they are logged again)."""
        self.enabled = enabled
        self.output_dir = output_dir
        self.figures = output_dir / "figures"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.figures.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        record = {"step": step, "kind": kind, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def reconstruction_figure(self, step: int, inputs: torch.Tensor, rows: list[tuple[str, torch.Tensor]]) -> Path:
        """Sagittal, coronal and axial mid-slices (one line each) per subject; columns input,
        reconstruction, progressive ones."""
        path = self.figures / f"reconstructions_step_{step:08d}.png"
        grid = []
        for i in range(inputs.shape[0]):
            grid.append([inputs[i, 0].cpu().numpy()] + [r[i, 0].cpu().numpy() for _, r in rows])
        viz.save_grid(grid, path, col_titles=["input"] + [name for name, _ in rows],
                      row_titles=[f"subject {i}" for i in range(len(grid))])
        return path

    def sample_figure(self, step: int, samples: np.ndarray, temperature: float,
                      means: np.ndarray | None = None) -> Path:
        """``samples_step_XXXXXXXX.png`` of ``samples`` (N, R, R, R); with ``means`` (the mean of
        p(x | z) of the same latents, when the voxels are drawn) each beside its sample."""
        path = self.figures / f"samples_step_{step:08d}.png"
        viz.save_samples_figure(list(samples), [] if means is None else list(means), path,
                                [f"sample {i}" for i in range(len(samples))],
                                f"prior samples, step {step}, temperature {temperature}")
        return path

    def curves_figure(self) -> None:
        """Training and validation bits/voxel so far (overwritten atomically each time)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return
        series: dict[str, tuple[list[float], list[float]]] = {}
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "elbo_bits_per_voxel" in rec:
                xs, ys = series.setdefault(rec["kind"], ([], []))
                xs.append(rec["step"])
                ys.append(rec["elbo_bits_per_voxel"])
        if series:
            viz.save_curves(series, self.figures / "curves.png", ylabel="negative ELBO (bits/voxel)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def drop_records_after(path: Path, step: int) -> None:
    """On resume: forget logged records newer than the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) > step:
                continue
        except (ValueError, AttributeError):
            continue
        kept.append(line + "\n")
    write_text(path, "".join(kept))

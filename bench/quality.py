#!/usr/bin/env python
"""Generative quality against training time, on the phantom population where the truth is known.

Trains a preset on the built-in phantom population (training seed from the configuration) for a
wall-clock budget or a number of steps, evaluates evenly spaced checkpoints on a held-out phantom
population made with another seed, and prints one table plus a learning-curve figure:

    python bench/quality.py --preset demo --minutes 60 --output runs/quality
    python bench/quality.py --preset demo --steps 500 --evaluations 4 --heldout-seed 2 \
        --set learning_rate=0.003 --precision bf16

Columns: held-out negative ELBO (bits/voxel), resolution levels without an active latent unit,
ratios to the real-vs-real baseline of the random-CNN Fréchet distance and MMD (n/a when the
unbiased real-vs-real MMD² is not positive, which happens with small sets), sample MS-SSIM
minus real-pair MS-SSIM, the samples' voxel-to-voxel roughness over the real volumes' and their
fine correlation minus the real volumes' (metrics/texture.py: grain reads > 1 and < 0),
1-Wasserstein ratios of the tissue volumes (samples vs real over real vs real, matched set sizes)
and the memorisation ratio (median nearest-training distance of samples over that of held-out
volumes) and what drew the samples' coarse latents: the learned prior or
the Gaussian fitted at the end of training (model/fitted_prior.py).  A checkpoint that samples
with the fitted Gaussian is read twice, once with the learned prior, so the curve shows what the
extra steps gave apart from the change of prior (the figure marks the fitted reading with a
star).  Nothing here is asserted anywhere: figures move with the machine,
the seed and the held-out population (vary ``--heldout-seed`` when you judge a change).

With ``--minutes``, a short calibration run measures the time per step and the cost of one
validation (with its quality signal, checkpoint and figures) first, and the number of steps is
chosen so that training (those validations included, the evaluations here excluded) fills the
budget; the learning-rate schedule then spans exactly those steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from verydeepvae.process_defaults import apply_cli_defaults

apply_cli_defaults()  # as the CLI does, before anything loads torch (a bounded OpenMP spin, process_defaults.py)

from verydeepvae.checkpoint import read_metadata
from verydeepvae.config import build_config, parse_override
from verydeepvae.data.datasets import population_seed
from verydeepvae.data.phantom import generate_population
from verydeepvae.evaluate import EvaluationOptions, run_evaluation
from verydeepvae.evaluate.summary import quality_row
from verydeepvae.generate import open_trained
from verydeepvae.train.loop import train

TISSUES = ("gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "brain_ml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--config", help="a configuration file applied after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock training budget")
    budget.add_argument("--steps", type=int, help="number of training steps (default: the preset's)")
    parser.add_argument("--evaluations", type=int, default=4, help="evenly spaced evaluated checkpoints")
    parser.add_argument("--heldout-seed", type=int, default=1, help="population seed of the held-out phantoms")
    parser.add_argument("--heldout-num", type=int, default=48)
    parser.add_argument("--samples", type=int, default=32, help="prior samples per evaluation")
    parser.add_argument("--set-size", type=int, help="volumes per set in the distances (evaluate --set-size; "
                        "default half of --heldout-num); 24 with --heldout-num 192 --samples 192 reads the "
                        "48-phantom ratios with less noise")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--output", "--output-dir", dest="output_dir", default="runs/quality",
                        help="where the run, its evaluations and the table go (default: runs/quality)")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(parse_override(text) for text in args.set)
    if args.precision:
        overrides["precision"] = args.precision
    base = build_config(args.preset, args.config, overrides)
    training_population = population_seed(base)
    if base.data_path is None and training_population == args.heldout_seed:
        parser.error(f"the training phantoms have population seed {training_population}: give another "
                     "--heldout-seed (the same seed makes the same subjects)")
    heldout = out / f"heldout_{base.resolution}_seed{args.heldout_seed}"
    if not (heldout / "participants.tsv").is_file():
        generate_population(args.heldout_num, base.resolution, heldout, args.heldout_seed, montage=False,
                            progress=False)

    steps = args.steps or base.max_steps
    seconds_per_step = seconds_per_validation = None
    if args.minutes:
        seconds_per_step, seconds_per_validation = calibrate(args, overrides, out)
        steps = steps_for_budget(args.minutes * 60, args.evaluations, seconds_per_step, seconds_per_validation)
        print(f"calibration: {seconds_per_step:.3f} s/step, {seconds_per_validation:.1f} s per validation -> "
              f"{steps} steps in {args.minutes:g} minutes", flush=True)
    if steps is None:
        parser.error("the preset sets no max_steps: give --steps or --minutes")
    every = max(1, steps // args.evaluations)
    steps = every * args.evaluations  # evaluations evenly spaced, the last at the end
    run_dir = out / "run"
    cfg = build_config(args.preset, args.config, {
        **overrides, "max_steps": steps, "checkpoint_every": every, "validation_every": every,
        "figures_every": every, "keep_checkpoints": 0, "output_dir": str(run_dir), "overwrite": True})
    started = time.perf_counter()
    train(cfg, show_progress=sys.stderr.isatty())
    train_seconds = time.perf_counter() - started

    restart = restart_record(run_dir)
    before = first_attempt_seconds(restart)
    if restart:
        print(f"the run started again at step {restart['step']} of its first attempt (its finest latent layer was "
              f"unused; train/finest_layer.py); the minutes include that attempt's {before / 60:.1f}", flush=True)
    elapsed = {step: seconds + before for step, seconds in _elapsed_by_step(run_dir / "metrics.jsonl").items()}
    rows = evaluate_checkpoints(run_dir, heldout, out, args, cfg.device, elapsed)
    summary = {"preset": args.preset, "overrides": overrides, "steps": steps, "train_seconds": train_seconds,
               "first_attempt": restart and {"step": restart["step"], "seconds": before},
               "seconds_per_step_calibrated": seconds_per_step,
               "seconds_per_validation_calibrated": seconds_per_validation, "heldout": str(heldout), "rows": rows}
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    curves_figure(rows, out / "learning_curves.png")
    print(f"training {train_seconds / 60:.1f} min; table in {out / 'quality.json'}, figure "
          f"{out / 'learning_curves.png'}, reports in {out}/evaluation_step_*")
    return 0


def evaluate_checkpoints(run_dir: Path, heldout: Path, out: Path, args, device, elapsed: dict[int, float]) -> list[dict]:
    """One table row per checkpoint, printed as it comes.  A checkpoint whose samples draw the
    coarse latents from the fitted Gaussian (the final one, when training kept it) gets a second
    row read with the learned prior, so the curve's last step does not mix a change of prior
    with the extra training."""
    rows: list[dict] = []
    for path in sorted((run_dir / "checkpoints").glob("step_*.safetensors")):
        trained = open_trained(path, device=device)
        step = trained.checkpoint.step
        logged = [s for s in elapsed if s <= step]
        minutes = elapsed[max(logged)] / 60.0 if logged else float("nan")
        for prior in ("auto", "learned"):
            folder = out / (f"evaluation_step_{step:08d}" + ("" if prior == "auto" else "_learned_prior"))
            report = run_evaluation(trained, heldout, folder, EvaluationOptions(
                num_samples=args.samples, temperature=args.temperature, seed=0, max_train=200,
                max_heldout=args.heldout_num, set_size=args.set_size, show_progress=False, prior=prior))
            rows.append({"step": step, "minutes": minutes, **quality_row(report.data)})
            print(format_row(rows[-1], header=len(rows) == 1), flush=True)
            if rows[-1]["prior"] == "learned":
                break
    return rows


CALIBRATION_STEPS = 24
CALIBRATION_VALIDATION_STEP = 12
CALIBRATION_SKIPPED_STEPS = 4  # start-up and first allocations


def calibrate(args, overrides: dict, out: Path) -> tuple[float, float]:
    """Seconds per training step, and the extra seconds one validation costs (its quality signal,
    checkpoint and figures included), of this configuration on this machine, from a short run with
    one validation in its middle. The first steps (start-up, first allocations) are left out."""
    run = out / "calibration"
    shutil.rmtree(run, ignore_errors=True)
    every = CALIBRATION_VALIDATION_STEP
    cfg = build_config(args.preset, args.config, {
        **overrides, "max_steps": CALIBRATION_STEPS, "log_every": 1, "validation_every": every,
        "figures_every": every, "checkpoint_every": every, "keep_checkpoints": 0, "output_dir": str(run),
        "overwrite": True})
    train(cfg, show_progress=False)
    return step_and_validation_seconds(_elapsed_by_step(run / "metrics.jsonl"), every, CALIBRATION_STEPS)


def step_and_validation_seconds(elapsed: dict[int, float], validation_step: int, last_step: int) -> tuple[float, float]:
    """(seconds per step, seconds per validation) from the elapsed time logged after every step of
    a run that validated once, after ``validation_step``: the step after it carries the validation."""
    first = CALIBRATION_SKIPPED_STEPS
    before = elapsed[validation_step] - elapsed[first]
    after = elapsed[last_step] - elapsed[validation_step + 1]
    per_step = (before + after) / (validation_step - first + last_step - validation_step - 1)
    validation = max(0.0, elapsed[validation_step + 1] - elapsed[validation_step] - per_step)
    return per_step, validation


def steps_for_budget(seconds: float, evaluations: int, per_step: float, per_validation: float) -> int:
    """Training steps that fill ``seconds`` with ``evaluations`` validations among them (the last at
    the end), at least one step per evaluation."""
    return max(evaluations, int((seconds - evaluations * per_validation) / per_step))


def restart_record(run_dir: Path) -> dict | None:
    """The final checkpoint's record of a run that started again (train/finest_layer.py), or None."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.safetensors"))
    return read_metadata(checkpoints[-1]).get("finest_layer_restart") if checkpoints else None


def first_attempt_seconds(restart: dict | None) -> float:
    """Training seconds of the attempt a run set aside before it started again (0 without one), so
    the table's minutes count from the start of the command's training."""
    path = Path(restart["first_attempt"]) / "metrics.jsonl" if restart else None
    logged = _elapsed_by_step(path) if path is not None and path.is_file() else {}  # none before its first log line
    return logged[max(logged)] if logged else 0.0


def _elapsed_by_step(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and "elapsed_seconds" in record:
            out[int(record["step"])] = float(record["elapsed_seconds"])
    return out


COLUMNS = [("step", "{:>6d}"), ("minutes", "{:>7.1f}"), ("bits_per_voxel", "{:>6.3f}"), ("dead_levels", "{:>12}"),
           ("frechet_ratio", "{:>7.2f}"), ("mmd_ratio", "{:>7.2f}"), ("ms_ssim_gap", "{:>+7.3f}"),
           ("roughness_ratio", "{:>6.2f}"), ("fine_correlation_gap", "{:>+6.2f}")] + \
          [(f"w1_ratio_{t}", "{:>6.2f}") for t in TISSUES] + [("memorisation_ratio", "{:>6.2f}"), ("prior", "{:>13}")]
HEADERS = {"step": "step", "minutes": "min", "bits_per_voxel": "bits", "dead_levels": "dead levels",
           "frechet_ratio": "FD x", "mmd_ratio": "MMD x", "ms_ssim_gap": "MSSSIM", "memorisation_ratio": "mem",
           "roughness_ratio": "rough", "fine_correlation_gap": "fine",
           "prior": "prior",
           **{f"w1_ratio_{t}": t.split("_")[0][:6] for t in TISSUES}}


def format_row(row: dict, header: bool = False) -> str:
    cells = []
    for key, fmt in COLUMNS:
        value = row.get(key)
        if key == "dead_levels":
            value = ",".join(f"{r}³" for r in value) or "none"
        if isinstance(value, float) and np.isnan(value):
            cells.append(f"{'n/a':>7}")
        else:
            cells.append(fmt.format(value) if value is not None else f"{'-':>7}")
    line = " ".join(cells)
    if not header:
        return line
    width = [len(c) for c in cells]
    names = " ".join(f"{HEADERS[k]:>{w}}" for (k, _), w in zip(COLUMNS, width))
    return names + "\n" + line


def curves_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [r for r in rows if not r.get("prior", "").startswith("fitted")]
    fitted = [r for r in rows if r.get("prior", "").startswith("fitted")]  # drawn as stars, off the lines

    def curve(ax, key, style, label):
        ax.plot([r["minutes"] for r in learned], [r[key] for r in learned], style, label=label)
        if fitted:
            ax.plot([r["minutes"] for r in fitted], [r[key] for r in fitted], "*", ms=11,
                    color=ax.get_lines()[-1].get_color(), label=None)

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    curve(axes[0], "bits_per_voxel", "o-", None)
    axes[0].set_ylabel("held-out bits/voxel")
    curve(axes[1], "frechet_ratio", "o-", "Fréchet (random CNN)")
    curve(axes[1], "mmd_ratio", "s-", "MMD")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ratio to real vs real (log)")
    axes[1].legend(fontsize=7, title=f"★ {fitted[0]['prior']} prior" if fitted else None, title_fontsize=7)
    for t in TISSUES:
        curve(axes[2], f"w1_ratio_{t}", "o-", t.replace("_ml", ""))
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_ylabel("tissue-volume W1 ratio")
    axes[2].legend(fontsize=7)
    curve(axes[3], "active_levels", "o-", None)
    axes[3].set_ylabel("levels with an active unit")
    for ax in axes:
        ax.set_xlabel("training minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""How many steps ``make demo`` trains here, so that the quick start stays within 10 minutes.

A CPU's speed decides it, and it is measured, not guessed: the same kind of 2-core AMD EPYC
without native bfloat16 trained the demo at 1.2 s/step one day and 2.1 s/step another (float32),
and ``make demo`` took 10 min 57 s with a fixed 250 steps on the slow day (7 December 2026,
docs/training-recipe.md).  So on a CPU this times :data:`PROBE_STEPS` training steps of the
``demo`` preset (as ``verydeepvae train`` would run them: its precision and memory format; 10-15 s
on that machine) and answers with as many steps as fit in what is left of :data:`BUDGET_SECONDS`
since ``make`` started, after :data:`RESERVE_SECONDS` for what follows the steps: never more than
the preset's 450, never fewer than :data:`MIN_STEPS`.  On a GPU the preset's steps fit with room to
spare and nothing is timed.  The count is printed; ``make demo DEMO_STEPS=N`` trains exactly N, for
a model that does not depend on the hour.  ``verydeepvae train --preset demo`` itself always trains
the preset's 450.

    python -m verydeepvae.demo_steps [--started EPOCH_SECONDS]   # the step count; the reason to stderr
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

BUDGET_SECONDS = 600.0  # the quick start's promise: `make demo` within 10 minutes, installation included
RESERVE_SECONDS = 100.0
"""What ``make demo`` spends after this command besides the steps: the start of training (12-13 s),
the end of training (the fitted prior, the last checkpoint, figures and samples: 25-35 s) and
``verydeepvae sample`` (8-12 s), measured on fresh clones of the same slow machine, and about 45 s
of margin.  Validations are part of the steps' time.  The probe's mean is not scaled: on a fresh
clone it read 2.06 s/step where the loop then ran 200 steps and two validations at 1.93 s/step, but
on another 1.74 s/step where the loop ran 250 at 1.83 (22 s more; 9 min 42 s in all with 25 s of
margin), so the margin covers a loop about 5 % slower than its probe."""
MIN_STEPS = 200
"""The fewest steps trained, however slow the machine: 200 steps still met every demo target for
the demo's training seed (Fréchet ratio 2.21-2.71, tissue ratios within 2.32, no dead level, on four
held-out readings); fewer were not measured."""
PROBE_STEPS = 4  # timed after one untimed step (the first pays for oneDNN's kernel choices)
STEP_ROUNDING = 10  # steps are a multiple of the preset's logging period


def planned_steps(full_steps: int, seconds_per_step: float | None, seconds_left: float) -> tuple[int, str]:
    """(steps, reason): the preset's ``full_steps`` where they fit (or where nothing was timed:
    ``seconds_per_step`` None), else as many as fit in ``seconds_left`` at ``seconds_per_step``,
    rounded down to :data:`STEP_ROUNDING` and at least :data:`MIN_STEPS`.  The reason (empty when
    nothing was timed) says how long a step took and what that allows."""
    if seconds_per_step is None:
        return full_steps, ""
    fit = int(max(seconds_left, 0.0) / max(seconds_per_step, 1e-9)) // STEP_ROUNDING * STEP_ROUNDING
    speed = f"a demo training step takes {seconds_per_step:.2f} s on this machine (measured)"
    if fit >= full_steps:
        return full_steps, f"make demo: {speed}, so all {full_steps} steps fit in the 10 minutes"
    steps = min(max(fit, MIN_STEPS), full_steps)
    if steps > fit:
        return steps, (f"make demo: {speed}, so it trains {steps} of its {full_steps} steps, the fewest that give "
                       f"recognisable brains, and may run past the 10-minute budget (make demo DEMO_STEPS=N "
                       f"trains N)")
    return steps, (f"make demo: {speed}, so {steps} of its {full_steps} steps fit in the 10 minutes "
                   f"(make demo DEMO_STEPS={full_steps} trains them all)")


def seconds_per_training_step(cfg, device, steps: int = PROBE_STEPS) -> float:
    """Mean seconds of ``steps`` training steps (forward, backward, clipping, the update and the
    EMA) of a fresh model of ``cfg`` on random volumes at ``cfg.batch_size``, after one untimed step.
    ``cfg``'s speed choices must already be resolved (``train.precision.resolve_speed_choices``)."""
    import torch

    from .model import VeryDeepVAE, autocast_for
    from .train.optim import EMA, build_optimiser

    model = VeryDeepVAE(cfg).to(device)
    optimiser, ema = build_optimiser(model, cfg), EMA(model, cfg.ema_rate)
    r = cfg.resolution
    x = torch.rand(cfg.batch_size, 1, r, r, r, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast_for(cfg.precision, device):
            loss = model(x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        ema.update(model)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.fmean(times)  # a slow step counts: the loop's own average includes them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verydeepvae.demo_steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--started", type=float, default=None,
                        help="when `make demo` started (seconds since the epoch); default: now")
    args = parser.parse_args(argv)
    started = time.time() if args.started is None else args.started

    from .process_defaults import apply_cli_defaults

    apply_cli_defaults()  # the bounded OpenMP spin `verydeepvae train` runs with, before torch loads
    from .config import build_config
    from .device import resolve_device
    from .train.precision import resolve_speed_choices

    device = resolve_device("auto")  # the device `verydeepvae train` picks by itself (the Makefile names none)
    cfg = resolve_speed_choices(build_config("demo"), device, [])
    timed = seconds_per_training_step(cfg, device) if device.type == "cpu" else None
    seconds_left = BUDGET_SECONDS - (time.time() - started) - RESERVE_SECONDS
    steps, reason = planned_steps(int(cfg.max_steps), timed, seconds_left)
    if reason:
        print(reason, file=sys.stderr)
    print(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

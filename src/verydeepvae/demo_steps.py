"""How many steps ``make demo`` trains here, so that the quick start stays within 10 minutes.

The ``demo`` preset's 450 steps take 4-6 minutes on a 2-core CPU with native bfloat16 (0.58 s/step)
and far less on a GPU or a CPU with more cores.  On 2 cores without native bfloat16 training runs in
float32 at 1.2-2.0 s/step (the same kind of 2-core AMD EPYC without AVX512-BF16, 6 December 2026,
varied that much from hour to hour), and 450 steps plus installation took 12 min 20 s.  There the
demo trains :data:`SHORT_STEPS` steps instead, the same preset with a shorter schedule.  300 steps
took 8 min 54 s and 9 min 18 s on a fast day but 10 min 29 s on a slow one (1.4-1.6 s/step); 250
took 8 min 43 s in that slow hour.  Their samples are grainier than the full demo's; for the demo's
training seed, 250 steps met the demo's targets on the four held-out readings taken, but other
training seeds did worse than with 300 (seed 5: Fréchet ratio 5.3-6.1 against 2.6-3.4;
docs/training-recipe.md).
``verydeepvae train --preset demo`` itself always trains the preset's 450; this only chooses what
the Makefile asks for.

    python -m verydeepvae.demo_steps       # prints the step count; the reason goes to stderr
"""

from __future__ import annotations

import os
import sys

SHORT_STEPS = 250  # 250 x 1.56 s + installation, start-up and sampling: 8 min 43 s on 2 slow fp32 cores
SLOW_CORES = 2  # at or below this many usable cores a float32 CPU is too slow for the full demo


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def demo_steps(full_steps: int, on_gpu: bool, native_bf16: bool, cores: int) -> tuple[int, str]:
    """(steps, reason): the preset's ``full_steps`` unless training would run in float32 on a CPU
    with at most :data:`SLOW_CORES` cores, then :data:`SHORT_STEPS` (never more than ``full_steps``)."""
    if on_gpu or native_bf16 or cores > SLOW_CORES:
        return full_steps, ""
    steps = min(SHORT_STEPS, full_steps)
    return steps, (f"make demo: this CPU has {cores} usable core(s) and no native bfloat16, so training runs in "
                   f"float32 (1.2-2.0 s/step on 2 cores): the demo trains {steps} of its {full_steps} steps to "
                   f"stay within 10 minutes (make demo DEMO_STEPS={full_steps} trains them all)")


def main() -> int:
    from .config import read_preset
    from .device import resolve_device
    from .train.precision import cpu_has_native_bf16

    # the device `verydeepvae train` picks by itself (the Makefile names none)
    on_gpu = resolve_device("auto").type == "cuda"
    steps, reason = demo_steps(int(read_preset("demo")["max_steps"]), on_gpu, cpu_has_native_bf16(), usable_cores())
    if reason:
        print(reason, file=sys.stderr)
    print(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

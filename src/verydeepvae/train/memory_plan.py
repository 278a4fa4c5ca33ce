"""How much memory a training process may use, and the ``checkpoint_levels`` that fit in it.

``checkpoint_levels: auto`` (the default) is resolved here, once per run and before any data work:
the estimator (``memory.py``: the tensors one training step keeps, at the run's precision and
micro-batch size) is compared with the device's memory, and the least recomputation that fits is
chosen (``memory.checkpoint_candidates``: none, then [0], [0, 1], ... up to all); on a CPU the
next levels follow when they are cheap to recompute (``CHEAP_RECOMPUTATION``).  An explicit
setting is kept as given, with a notice when it will not fit; when not even checkpointing every
level fits, the run stops before it starts with one line saying what would fit.

A :class:`Budget` has two numbers.  ``limit`` is what auto plans with; ``hard`` is what the device
has, beyond which the run would fail (the refusal and the "will not fit" notice use it):

* CUDA: both are the device's free memory (``torch.cuda.mem_get_info``, measured before the model
  is built, so the CUDA context is already subtracted) less ``CUDA_RESERVE_FRACTION`` of its total;
* CPU: ``hard`` is the available RAM (``MemAvailable``, capped by a cgroup memory limit) split
  between the ranks on this machine, ``limit`` is ``CPU_RAM_SHARE`` of it; the estimate is
  multiplied by ``CPU_HEAP_FACTOR`` before either comparison, since the peak RSS exceeds the live
  tensors.  When nothing fits ``limit`` but checkpointing every level fits ``hard``, auto takes
  every level and says that it goes beyond its headroom.

Under torch.distributed every rank measures its own budget, the smallest is all-reduced, and every
rank applies the same rule to the same configuration and budget: all ranks make the same choice,
or raise the same error, with nothing else broadcast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from .. import memory
from ..config import Config
from ..errors import UserError

CPU_HEAP_FACTOR = 1.46
"""Peak RSS of a CPU training process / the estimator's live tensor bytes.  Measured with
``bench/train_step.py --preset 128 --batch-size 1`` on the development machine (2-core AMD EPYC with
AVX512-BF16, 24 GiB, torch 2.13.0 CPU, glibc's default malloc): bf16 + channels-last with every
level checkpointed peaked at 5.76 GiB RSS against an estimate of 3.95 GiB (1.46x); fp32 with
checkpointing at 6.45 against 6.36 GiB (1.01x).  The excess is glibc keeping freed tensors of a
few MiB in its heap (memory.py); the larger factor is used for every precision, to be safe."""

CPU_RAM_SHARE = 0.5
"""The share of the available RAM that auto plans a CPU run with (it still takes up to all of it,
with every level checkpointed, rather than refuse).  Unlike a CUDA out-of-memory error, which
training turns into one line, running out of RAM ends in swapping or in the kernel's OOM killer
(SIGKILL: no message, no checkpoint), and what is available when a run of days starts is not what
stays available: other jobs grow, the data loader's workers and the data's page cache take their
part, and the heap factor above was measured for one configuration.  With half, preset 128 at
batch size 1 on the 24 GiB development machine plans with levels 0 and 1 (bf16, about 6.6 GiB
with the heap factor) or 0 to 2 (fp32) checkpointed instead of none (about 19 GiB in bf16); in bf16
level 2 is then added as cheap to recompute."""

CHEAP_RECOMPUTATION = 0.05
WORTH_SAVING = 0.10
"""On a CPU, auto also checkpoints the next level when recomputing it adds at most
``CHEAP_RECOMPUTATION`` of a step's convolution work and lowers the estimated peak by at least
``WORTH_SAVING``: RAM is shared with the data, the page cache and other jobs, and running out of it
kills the run (``CPU_RAM_SHARE``).  Preset 128 at batch size 1: the 32³ level, 4 % more work, 0.6 GiB
(14 %) less; measured 4.2 against 4.7 GiB (docs/performance.md).  A GPU's memory serves this process
alone, so there auto keeps to the least recomputation."""

CUDA_RESERVE_FRACTION = 0.10
"""The share of a GPU's total memory kept out of its budget: the caching allocator's fragmentation
and cuDNN's workspaces (autotuning tries algorithms with large ones), neither of which the
estimator counts, and NCCL's buffers under torch.distributed.  Not measured (no GPU was at hand)."""

_NO_CGROUP_LIMIT = 2**60  # cgroup v1 reports "no limit" as a huge number (9223372036854771712)


@dataclass(frozen=True)
class Budget:
    """Memory for a training step: auto plans within ``limit`` bytes, and the device has ``hard``
    (both None: unknown); the estimator's figure times ``factor`` is compared with them.
    ``source`` and ``hard_source`` say where the numbers come from (for messages)."""

    limit: int | None
    hard: int | None
    factor: float
    source: str
    hard_source: str
    spare: bool = False  # also checkpoint levels that are cheap to recompute (``with_cheap_levels``)

    def needed(self, estimate_bytes: int) -> int:
        """The memory a step estimated at ``estimate_bytes`` takes on this device."""
        return math.ceil(estimate_bytes * self.factor)

    def in_estimate_bytes(self, value: int | None) -> int:
        """``value`` (``limit`` or ``hard``) in the estimator's bytes, what ``MemoryEstimate`` compares with."""
        return int((value or 0) / self.factor)


class PlanRecord(TypedDict):
    """A plan as JSON (a checkpoint's ``memory`` entry); bytes, None where unknown."""

    checkpoint_levels: list[int] | str
    auto: bool
    estimated_peak_bytes: int
    factor: float
    needed_bytes: int
    limit_bytes: int | None
    limit_source: str
    available_bytes: int | None
    available_source: str


@dataclass(frozen=True)
class Plan:
    """The checkpoint levels a run trains with, and the numbers behind them."""

    levels: list[int]
    auto: bool  # chosen by checkpoint_levels auto (False: configured)
    estimate: int  # the estimator's peak at the run's batch size, bytes
    budget: Budget
    num_levels: int
    cheap: tuple[int, ...] = ()  # levels auto added because they are cheap to recompute

    @property
    def needed(self) -> int:
        return self.budget.needed(self.estimate)

    @property
    def fits(self) -> bool | None:
        """Within the device's memory (None when it is unknown)."""
        return None if self.budget.hard is None else self.needed <= self.budget.hard

    @property
    def within_limit(self) -> bool | None:
        """Within what auto plans with (None when it is unknown)."""
        return None if self.budget.limit is None else self.needed <= self.budget.limit

    def setting(self) -> list[int] | str:
        """The value of ``checkpoint_levels`` that means these levels: none, all or the list."""
        shown = memory.levels_text(self.levels, self.num_levels)
        return shown if shown in ("none", "all") else list(self.levels)

    def record(self) -> PlanRecord:
        """The plan as JSON (the checkpoint's ``memory`` entry)."""
        return {"checkpoint_levels": self.setting(), "auto": self.auto, "estimated_peak_bytes": self.estimate,
                "factor": self.budget.factor, "needed_bytes": self.needed, "limit_bytes": self.budget.limit,
                "limit_source": self.budget.source, "available_bytes": self.budget.hard,
                "available_source": self.budget.hard_source}


def plan(cfg: Config, budget: Budget) -> Plan:
    """The levels ``cfg`` trains with under ``budget``: its own when explicit; for ``auto`` the least
    recomputation within ``budget.limit`` (every level when nothing is; none when the budget is
    unknown).  ``cfg.precision`` should be resolved already (``auto`` counts as fp32)."""
    est = memory.estimate(cfg)
    auto = cfg.checkpoint_levels == "auto"
    cheap: list[int] = []
    if not auto:
        levels = cfg.checkpointed_levels()
    elif budget.limit is None:
        levels = []
    else:
        chosen = est.least_recomputation(cfg.batch_size, budget.in_estimate_bytes(budget.limit))
        levels = list(range(cfg.num_levels)) if chosen is None else chosen
        if budget.spare:
            cheap = with_cheap_levels(est, cfg.batch_size, levels)
            levels = levels + cheap
    return Plan(levels, auto, est.peak(cfg.batch_size, levels), budget, cfg.num_levels, tuple(cheap))


def with_cheap_levels(est: memory.MemoryEstimate, batch_size: int, levels: list[int]) -> list[int]:
    """The next levels of ``memory.checkpoint_candidates`` after ``levels`` that are worth
    checkpointing although the memory would be there (``CHEAP_RECOMPUTATION``, ``WORTH_SAVING``)."""
    added: list[int] = []
    while len(levels) + len(added) < len(est.levels):
        now = levels + added
        extra = len(now)
        if (est.recomputation_share(extra) > CHEAP_RECOMPUTATION
                or est.peak(batch_size, now + [extra]) > (1 - WORTH_SAVING) * est.peak(batch_size, now)):
            break
        added.append(extra)
    return added


def resolve(cfg: Config, runtime: Any, notices: list[str]) -> tuple[Config, Plan]:
    """Training's memory decision (``runtime``: distributed.Runtime): ``cfg`` with ``auto`` replaced
    by the chosen levels (what the checkpoint stores), and the plan.  Adds one line to ``notices``
    for an automatic choice or an explicit setting that will not fit; raises UserError when
    ``auto`` finds nothing that fits."""
    budget = smallest_over_ranks(device_budget(runtime.device, runtime.local_world_size), runtime)
    chosen = plan(cfg, budget)
    if chosen.auto and chosen.fits is False:
        raise UserError(nothing_fits_message(cfg, chosen, runtime.device.type))
    if chosen.auto:
        notices.append(describe(chosen))
        cfg = dataclasses.replace(cfg, checkpoint_levels=chosen.setting())
    elif chosen.fits is False:
        notices.append(too_big_notice(cfg, chosen, runtime.device.type))
    return cfg, chosen


# -- messages --------------------------------------------------------------------------------------
def _peak_text(p: Plan) -> str:
    text = f"estimated peak {memory.format_bytes(p.needed)}"
    if p.budget.factor != 1.0:
        text += f" ({memory.format_bytes(p.estimate)} of tensors x {p.budget.factor:g} for the CPU heap)"
    return text


def _limit_text(budget: Budget) -> str:
    return f"{memory.format_bytes(budget.limit or 0)} ({budget.source})"


def _hard_text(budget: Budget) -> str:
    return f"{memory.format_bytes(budget.hard or 0)} of {budget.hard_source}"


def describe(p: Plan) -> str:
    """The one line that reports an automatic choice."""
    if p.budget.limit is None:
        where = f"({p.budget.source}: assumed to fit)"
    elif p.within_limit:
        where = f"of {_limit_text(p.budget)}"
    else:
        where = f"beyond the {_limit_text(p.budget)} planned for, within the {_hard_text(p.budget)}"
    cheap = f"; {list(p.cheap)} added because it is cheap to recompute" if p.cheap else ""
    return (f"memory: {_peak_text(p)} {where} -> checkpoint_levels {memory.levels_text(p.levels, p.num_levels)}"
            f" (auto{cheap})")


def what_fits(cfg: Config, budget_estimate_bytes: int, device_type: str) -> tuple[str, bool]:
    """What the estimate fits in a budget given in the estimator's bytes, and whether any batch
    does: the largest batch with every level checkpointed, and with half precision when the run is
    in fp32 (bf16 on a CPU, fp16 on a GPU)."""
    every = list(range(cfg.num_levels))
    est = memory.estimate(cfg)
    batch = est.max_batch_size(budget_estimate_bytes, every)
    low, low_batch = None, 0
    if cfg.precision in ("fp32", "auto"):
        low = "bf16" if device_type == "cpu" else "fp16"
        low_est = memory.estimate(dataclasses.replace(cfg, precision=low))
        low_batch = low_est.max_batch_size(budget_estimate_bytes, every)
    if batch:
        text = f"the estimate fits batch_size {batch} with checkpoint_levels all"
        return text + (f", {low_batch} with precision {low} too" if low else ""), True
    if low_batch:
        return (f"the estimate fits no batch size with checkpoint_levels all, but batch_size {low_batch} with "
                f"precision {low}"), True
    nor = f", nor with precision {low}" if low else ""
    return (f"the estimate fits no batch size with checkpoint_levels all{nor} (the fixed part alone, weights, "
            f"gradients, optimiser moments and EMA, is {memory.format_bytes(est.fixed_bytes)})"), False


def nothing_fits_message(cfg: Config, p: Plan, device_type: str) -> str:
    advice, some_batch_fits = what_fits(cfg, p.budget.in_estimate_bytes(p.budget.hard), device_type)
    how = ("try those settings (--set batch_size=N, with more grad_accumulation to keep the effective batch), "
           if some_batch_fits else "try a smaller model or a device with more memory, ")
    return (f"memory: training needs an {_peak_text(p)} at batch_size {cfg.batch_size} (precision "
            f"{cfg.precision}) even with checkpoint_levels all, more than the {_hard_text(p.budget)}; "
            f"{advice}; {how}or --set checkpoint_levels=all to try anyway "
            "(verydeepvae config show --estimate-memory lists the options)")


def too_big_notice(cfg: Config, p: Plan, device_type: str) -> str:
    shown = memory.levels_text(p.levels, p.num_levels)
    auto = plan(dataclasses.replace(cfg, checkpoint_levels="auto"), p.budget)
    instead = (f"checkpoint_levels auto would pick {memory.levels_text(auto.levels, auto.num_levels)}"
               if auto.fits else what_fits(cfg, p.budget.in_estimate_bytes(p.budget.hard), device_type)[0])
    return (f"memory: checkpoint_levels {shown} (configured) at batch_size {cfg.batch_size} needs an "
            f"{_peak_text(p)}, more than the {_hard_text(p.budget)}, so it may run out of memory; {instead}")


def for_config_show(cfg: Config, gpu_memory: int | None, notices: list[str]) -> tuple[Config, list[int] | None, str]:
    """What training would decide, for ``config show --estimate-memory``: the configuration to
    estimate (the ``auto`` precision and memory format resolved as training would on this machine;
    left as they are with ``--gpu-memory``, a GPU not at hand, where auto counts as fp32), the levels ``auto`` picks
    (None: nothing fits) and a line saying why."""
    if gpu_memory is not None:
        budget, where, device_type = gpu_budget(gpu_memory), "on a GPU with this much free memory", "cuda"
    else:
        from .distributed import choose_device
        from .precision import resolve_speed_choices

        try:
            device = choose_device(cfg, 0)
        except UserError:  # e.g. device cuda on a machine without one: show the CPU's figures
            device = torch.device("cpu")
        cfg = resolve_speed_choices(cfg, device, notices)
        budget, where, device_type = device_budget(device), f"on this machine ({device})", device.type
    auto = plan(dataclasses.replace(cfg, checkpoint_levels="auto"), budget)
    if budget.limit is not None and not auto.fits:
        advice, _ = what_fits(cfg, budget.in_estimate_bytes(budget.hard), device_type)
        return cfg, None, (f"auto {where}: nothing fits the {_hard_text(budget)} at batch_size {cfg.batch_size}, "
                           f"training would stop; {advice}")
    return cfg, auto.levels, f"auto {where}: " + describe(auto).removeprefix("memory: ")


# -- the budget ------------------------------------------------------------------------------------
def device_budget(device: torch.device, local_ranks: int = 1) -> Budget:
    """What one training process may use on ``device`` (see the module docstring);
    ``local_ranks``: training processes sharing this machine's RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return _gpu(free, total, f"on {device}")
    if device.type != "cpu":
        return Budget(None, None, 1.0, f"the memory of {device} is unknown", "unknown memory")
    available, source = available_ram()
    if available is None:
        return Budget(None, None, CPU_HEAP_FACTOR, "the available RAM is unknown", "unknown memory")
    hard = available // max(1, local_ranks)
    if local_ranks > 1:
        source += f" shared by {local_ranks} processes"
    return Budget(int(hard * CPU_RAM_SHARE), hard, CPU_HEAP_FACTOR,
                  f"{CPU_RAM_SHARE:.0%} of {memory.format_bytes(hard)} {source}", source, spare=True)


def gpu_budget(free_bytes: int) -> Budget:
    """The budget training would take on a GPU with ``free_bytes`` free (``config show --gpu-memory``)."""
    return _gpu(free_bytes, free_bytes, "with --gpu-memory")


def _gpu(free: int, total: int, where: str) -> Budget:
    reserve = int(CUDA_RESERVE_FRACTION * total)
    how = f"{memory.format_bytes(free)} free less a {CUDA_RESERVE_FRACTION:.0%} reserve"
    usable = max(0, free - reserve)
    return Budget(usable, usable, 1.0, f"{how} {where}", f"free memory {where} ({how})")


def smallest_over_ranks(budget: Budget, runtime: Any) -> Budget:
    """The smallest budget of all ranks (an unknown one counts as unlimited), on every rank."""
    if not runtime.distributed:
        return budget
    from . import distributed

    own = [math.inf if v is None else float(v) for v in (budget.limit, budget.hard)]
    smallest = (-distributed.all_reduce_max(-torch.tensor(own, dtype=torch.float64), runtime)).tolist()
    if smallest == own:
        return budget
    if math.isinf(smallest[0]):
        return dataclasses.replace(budget, limit=None, hard=None)
    return Budget(int(smallest[0]), int(smallest[1]), budget.factor,
                  f"the smallest budget of the {runtime.world_size} processes",
                  f"the smallest available memory of the {runtime.world_size} processes", budget.spare)


def available_ram() -> tuple[int | None, str]:
    """Bytes of RAM a new process can take, and what the number is: ``MemAvailable`` (or, on
    kernels without it, ``MemTotal``; psutil where there is no ``/proc/meminfo``), lowered to a
    cgroup memory limit (a container's or a batch job's) when that is smaller."""
    info = _meminfo()
    value, source = None, ""
    if "MemAvailable" in info:
        value, source = info["MemAvailable"], "available RAM"
    elif "MemTotal" in info:
        value, source = info["MemTotal"], "RAM (MemTotal; no MemAvailable on this system)"
    else:
        try:
            import psutil  # not a dependency: used when it is there

            value, source = int(psutil.virtual_memory().available), "available RAM"
        except ImportError:
            pass
    limit = cgroup_memory_limit()
    if limit is not None and (value is None or limit < value):
        return limit, "the cgroup memory limit"
    return value, source


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` in bytes ({} where there is none)."""
    values = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return {}
    return values


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The smallest memory limit on this process's cgroup and its parents (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None.  The limit itself, not the limit less the usage: usage
    counts reclaimable page cache, which would make a data-heavy job look full."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):  # v1
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            try:
                text = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < _NO_CGROUP_LIMIT:
                limits.append(int(text))
    return min(limits) if limits else None

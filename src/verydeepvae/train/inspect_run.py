"""``verydeepvae inspect RUN``: one screen about a run folder, read without disturbing it.

What a person asks first about a run -- is it training now, how far is it, which checkpoint is the
newest and which the best, how good were the last validation and sample-quality figures, what
configuration and software made it -- is spread over several files.  Everything here comes from
files the run writes anyway, and nothing is written or locked: the run record (``run.json``),
the newest checkpoint's header (never its tensors), ``checkpoints/best.json``, the last records of
``metrics.jsonl``, ``train.log`` and the folder's lock, probed (:func:`run_folder.probe`).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..json_types import JSONObject
from .. import checkpoint as ckpt
from . import run_folder, run_record
from .progress import LOG_NAME, active_units_by_level
from .reporting import to_bits

if TYPE_CHECKING:
    from ..model.fitted_prior import FittedPriorChoice

MetricsRecord = JSONObject  # a line of metrics.jsonl as read back: its kind and step are checked, the rest is read with .get


def inspect_run(folder: str | Path) -> list[str]:
    """The lines of the screen; a folder that holds no run is a :class:`UserError`."""
    folder = Path(folder)
    checkpoints = ckpt.list_checkpoints(ckpt.checkpoint_dir(folder))
    record_path = folder / run_record.RECORD_NAME
    if not folder.is_dir() or not (record_path.is_file() or checkpoints or (folder / "metrics.jsonl").is_file()):
        raise UserError(f"{folder} is not a run folder (no {run_record.RECORD_NAME}, checkpoints/ or metrics.jsonl)")
    sessions = run_record.read(record_path)["sessions"] if record_path.is_file() else []
    newest_meta = ckpt.read_metadata(checkpoints[-1]) if checkpoints else None
    last = _last_records(folder / "metrics.jsonl")
    lines = [f"run {folder}", f"  status: {_status(folder)}"]
    if sessions:
        lines += _sessions(sessions)
    else:
        lines.append(f"  no run record ({run_record.RECORD_NAME}): a run of an earlier version, or one that never "
                     "started training; configuration from the newest checkpoint")
    config = sessions[-1]["config"] if sessions else (ckpt.config_values(newest_meta, checkpoints[-1])
                                                        if newest_meta else None)
    if config is not None:
        lines += _configuration(config, sessions[-1] if sessions else {})
    lines.append(_steps(sessions, newest_meta, config, last))
    lines += _checkpoints(folder, checkpoints)
    if newest_meta and newest_meta.get("fitted_prior"):
        lines.append(_prior(newest_meta["fitted_prior"]))
    if newest_meta and newest_meta.get("voxel_noise"):
        noise = newest_meta["voxel_noise"]
        shown = " / ".join(_num(v, 2) for v in noise.get("correlations", []))
        lines.append(f"  drawn voxels: neighbour correlation {shown} (depth / height / width), measured on "
                     f"{noise.get('num_volumes')} training volumes")
    if newest_meta and newest_meta.get("finest_layer_restart"):
        restart = newest_meta["finest_layer_restart"]
        lines.append(f"  started again at step {restart.get('step')}: the finest latent layer carried "
                     f"{_num(restart.get('kl_bits_per_voxel'))} bits/voxel of KL; kl_free_bits_per_latent "
                     f"{(config or {}).get('kl_free_bits_per_latent')} since; the first attempt is in "
                     f"{restart.get('first_attempt')}")
    lines += _figures(last)
    lines.append(_log(folder))
    return lines


def _status(folder: Path) -> str:
    probed = run_folder.probe(folder)
    if probed is None:
        return "not training (no process has held the folder's lock)"
    held, holder = probed
    return f"training now ({holder})" if held else f"not training (last: {holder or 'unknown'})"


def _sessions(sessions: list[run_record.Session]) -> list[str]:
    first, newest = sessions[0], sessions[-1]
    lines = [f"  started {first.get('started', '?')}: {first.get('command', '?')}"]
    if len(sessions) > 1:
        how = "restarted by torchrun" if newest.get("restarted_by_torchrun") else "resumed"
        lines.append(f"  {len(sessions)} sessions; the newest {how} at step {newest.get('start_step', '?')} on "
                     f"{newest.get('started', '?')}: {newest.get('command', '?')}")
    lines += run_record.describe(newest)
    return lines


def _configuration(config: JSONObject, session: run_record.Session | dict) -> list[str]:
    layers = sum(config.get("latent_feature_maps_per_resolution") or [])
    data = session.get("data") or {}
    volumes = f" ({data['train']} training / {data['validation']} validation volumes)" if "train" in data else ""
    source = config.get("data_path") or f"the built-in phantom population of {config.get('phantom_num')}"
    return [
        f"  model: {config.get('resolution')}³, channels {config.get('channels')}, {layers} latent layers, "
        f"{config.get('likelihood')} likelihood",
        f"  training: batch {config.get('batch_size')} x grad_accumulation {config.get('grad_accumulation')} x "
        f"world size {session.get('world_size', '?')}; {config.get('optimiser')} learning rate "
        f"{config.get('learning_rate')}; precision {config.get('precision')}; seed {config.get('seed')}",
        f"  data: {source}{volumes}",
    ]


def _steps(sessions: list[run_record.Session], meta: ckpt.CheckpointMeta | None, config: JSONObject | None,
           last: dict[str, MetricsRecord]) -> str:
    done = max([int(last[k]["step"]) for k in ("train", "validation") if k in last] +
               [int(meta["step"]) if meta else 0])
    total = sessions[-1].get("total_steps") if sessions else None
    if total is None and meta is not None and config is not None:
        total = config.get("max_steps") or (config.get("total_epochs") or 10) * int(meta.get("steps_per_epoch", 1))
    share = f" ({100 * done / total:.0f} %)" if total else ""
    elapsed = last.get("train", {}).get("elapsed_seconds")
    took = ""
    if isinstance(elapsed, (int, float)) and math.isfinite(elapsed):
        from tqdm import tqdm

        took = f"; {tqdm.format_interval(elapsed)} of training in the newest session"
    return f"  steps: {done} of {total or '?'}{share}{took}"


def _checkpoints(folder: Path, checkpoints: list[Path]) -> list[str]:
    if not checkpoints:
        return ["  checkpoints: none yet"]
    newest = checkpoints[-1]
    when = datetime.datetime.fromtimestamp(newest.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    lines = [f"  newest checkpoint: {newest.relative_to(folder)} (written {when}); {len(checkpoints)} kept"]
    best = ckpt.read_best(ckpt.checkpoint_dir(folder))
    if best is not None:
        value = best.get("validation_loss")
        bits = f": {to_bits(value):.4f} bits/voxel" if isinstance(value, (int, float)) else ""
        lines.append(f"  best checkpoint: checkpoints/{best['checkpoint']} (validation at step {best.get('step')}{bits})")
    return lines


def _prior(meta: FittedPriorChoice) -> str:
    """The newest checkpoint's choice of prior for the coarsest latents (train/fit_prior.py)."""
    # imported here: only a checkpoint with a prior choice needs the model package
    from ..model.fitted_prior import chosen_prior_text

    distances = meta.get("frechet_to_training") or {}
    shown = ", ".join(f"{k} {_num(v, 1)}" for k, v in distances.items())
    detail = f" (Fréchet distance to the training volumes: {shown})" if shown else ""
    return f"  coarse-level prior for sampling: {chosen_prior_text(meta)}{detail}"


def _figures(last: dict[str, MetricsRecord]) -> list[str]:
    lines = []
    if "train" in last:
        r = last["train"]
        lines.append(f"  last training figures (step {r['step']}): {_num(r.get('elbo_bits_per_voxel'))} bits/voxel, "
                     f"KL {_num(r.get('kl_bits_per_voxel'))}, gradient norm {_num(r.get('grad_norm'), 2)}, skipped "
                     f"updates {r.get('skipped_nonfinite', 0)} non-finite + {r.get('skipped_large', 0)} large")
    if "validation" in last:
        r = last["validation"]
        lines.append(f"  last validation (step {r['step']}): {_num(r.get('elbo_bits_per_voxel'))} bits/voxel "
                     f"(reconstruction {_num(r.get('nll_bits_per_voxel'))}, KL {_num(r.get('kl_bits_per_voxel'))})")
    else:
        lines.append("  last validation: none yet")
    if "quality" in last:
        r = last["quality"]
        units = ", ".join(f"{level}³ {int(v)}" for level, v in active_units_by_level(r).items())
        parts = [f"Fréchet ratio {_num(r.get('frechet_ratio'), 2)} (1: as close as real volumes are to each other)"]
        if "dead_levels" in r:
            parts.append(f"dead latent levels {_num(r['dead_levels'], 0)}")
        if units:
            parts.append(f"active units {units}")
        lines.append(f"  sample quality (step {r['step']}): " + "; ".join(parts))
    return lines


def _log(folder: Path) -> str:
    path = folder / LOG_NAME
    if not path.is_file():
        return f"  log: no {LOG_NAME}"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    warnings = sum(1 for line in text if " warning: " in line)
    ending = text[-1].split(" ", 2)[-1] if text else ""
    return f"  log: {LOG_NAME}, {warnings} warning(s); last line: {ending}"


def _last_records(path: Path) -> dict[str, MetricsRecord]:
    """The newest ``metrics.jsonl`` record of each kind (train, validation, quality)."""
    last: dict[str, MetricsRecord] = {}
    if not path.is_file():
        return last
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(record, dict) and isinstance(record.get("kind"), str) and isinstance(record.get("step"), int):
                last[record["kind"]] = record
    return last


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"

"""What ``--resume`` does with each configuration key that differs from the run's checkpoint.

Every key of :class:`~verydeepvae.config.Config` has one rule (``tests/test_resume_changes.py``
checks that none is missing); the README's table is this one:

* **refused** (one line, exit 2, nothing changed): the architecture (the weights would not fit),
  the preprocessing (``clamp_percentiles``, ``intensity_anchor_percentile``, ``crop_to_foreground``:
  the model would see its data differently from then on, and its intensity reference would be wrong) and the optimiser type
  (its state cannot carry over; ``--set restore_optimiser=false`` resumes with a fresh optimiser);
* **kept from the run**: ``seed`` (a resumed run continues its own random streams and data
  order; start a fresh run for another seed) and the data selection (``data_path``,
  ``nifti_filename_pattern``, ``max_niis_to_use``, ``train_fraction``): ``split.json`` fixes
  the files, and new files in the folder are not used; likewise ``covariates_file``:
  ``covariates.json`` fixes every scan's covariates and their standardisation (``condition_on``
  belongs to the architecture);
* **honoured, with a notice** saying what it means for exactness: the optimisation and loss
  settings, batch size, accumulation, schedule and length, augmentation, precision;
* **honoured silently**: where outputs go and how often, logging, performance modes that do not
  change the maths (``channels_last``, ``compile``, ``checkpoint_levels``, workers, threads).
"""

from __future__ import annotations

import dataclasses

from ..config import ARCHITECTURE_BEFORE_KEY, Config
from ..errors import UserError
from ..checkpoint import ARCHITECTURE_KEYS
from ..json_types import JSONObject

PREPROCESSING = ("clamp_percentiles", "intensity_anchor_percentile", "crop_to_foreground")
# the architecture is compared by checkpoint.architecture_difference (derived widths resolved)
ARCHITECTURE = (*ARCHITECTURE_KEYS, "channels_hidden", "channels_top_down", "channels_hidden_top_down")
REFUSED = (*PREPROCESSING, "optimiser")
KEPT_FROM_RUN = ("seed", "data_path", "nifti_filename_pattern", "max_niis_to_use", "train_fraction", "phantom_num",
                 "skip_bad_files", "covariates_file")
NOTICED = {
    "batch_size": "the batches (and the data order) from here on differ from an uninterrupted run; the learning "
                  "rate is not rescaled",
    "grad_accumulation": "the effective batch from here on differs; the learning rate is not rescaled",
    "max_steps": "the run's length changes, and with it the learning-rate schedule from here on",
    "total_epochs": "the run's length changes, and with it the learning-rate schedule from here on",
    "learning_rate": "the new value applies from the next step",
    "lr_schedule": "the new schedule applies from the next step",
    "lr_min_ratio": "the new schedule applies from the next step",
    "warmup_steps": "the new schedule applies from the next step",
    "weight_decay": "the new value applies from the next step",
    "l2_reg_coeff": "the loss changes from the next step",
    "grad_clip": "the new value applies from the next step",
    "skip_factor": "the update-skipping rule changes from the next step",
    "skip_window": "the update-skipping rule changes from the next step",
    "skip_warmup_steps": "the update-skipping rule changes from the next step",
    "skip_threshold": "the update-skipping rule changes from the next step",
    "max_consecutive_skips": "the update-skipping rule changes from the next step",
    "ema_rate": "the EMA weights average at the new rate from the next step",
    "kl_warmup_steps": "the KL weight follows the new warm-up from the next step",
    "kl_warmup_resolutions": "the KL weight follows the new warm-up from the next step",
    "kl_balance": "the loss changes from the next step",
    "kl_free_bits": "the loss changes from the next step",
    "kl_free_bits_per_latent": "the loss changes from the next step",
    "kl_free_bits_per_latent_resolutions": "the loss changes from the next step",
    "kl_free_bits_per_latent_steps": "the loss changes from the next step",
    "finest_layer_restart_step": "the check of the finest latent layer follows the new value if the run has not "
                                 "passed it",
    "finest_layer_restart_kl": "the check of the finest latent layer follows the new value if the run has not "
                               "passed it",
    "output_scale_max": "the likelihood's scale ceiling changes from the next step",
    "precision": "the arithmetic changes from the next step (not bitwise the same as an uninterrupted run)",
    "deterministic": "GPU algorithms change from the next step",
    "augment": "the augmentation changes from the next step",
    "aug_prob_affine": "the augmentation changes from the next step",
    "aug_prob_elastic": "the augmentation changes from the next step",
    "aug_prob_bias_field": "the augmentation changes from the next step",
    "aug_prob_gamma": "the augmentation changes from the next step",
    "aug_prob_anisotropy": "the augmentation changes from the next step",
    "aug_prob_haircut": "the augmentation changes from the next step",
    "restore_optimiser": "",
}
SILENT = ("log_every", "validation_every", "checkpoint_every", "figures_every", "validation_period_epochs",
          "checkpoint_period_epochs", "figures_period_epochs", "keep_checkpoints", "subjects_to_plot",
          "max_validation_batches", "quality_samples", "cache_dir", "num_workers",
          "visualise_training_pipeline_before_starting", "output_dir", "device", "CUDA_devices",
          "threads_per_rank", "resume", "overwrite", "checkpoint_levels", "channels_last", "compile",
          "fitted_prior", "fitted_prior_components", "fit_voxel_noise", "sample_voxels")


def apply(configured: Config, stored: JSONObject, notices: list[str], restart: JSONObject | None = None) -> Config:
    """The configuration a resumed run continues with: refuses what cannot change, keeps what
    belongs to the run, and says what changes.  ``stored`` is the checkpoint's configuration
    (its architecture has been checked already); ``restart``, the checkpoint's record of a run
    that started again with an allowance (train/finest_layer.py)."""
    stored = {**ARCHITECTURE_BEFORE_KEY, **stored}
    configured = _keep_restart_allowance(configured, stored, restart, notices)
    current = configured.to_dict()
    changed = [k for k in current if k in stored and current[k] != stored[k] and k not in ARCHITECTURE]
    refused = [k for k in changed if k in REFUSED and not (k == "optimiser" and not configured.restore_optimiser)]
    if refused:
        shown = "; ".join(f"{k}: run {stored[k]!r}, now {current[k]!r}" for k in refused)
        how = ("resume with --set restore_optimiser=false to start the optimiser afresh" if refused == ["optimiser"]
               else "start afresh with --overwrite or another --output")
        raise UserError(f"--resume cannot change {', '.join(refused)} ({shown}); {how}")
    keep = {k: stored[k] for k in changed if k in KEPT_FROM_RUN}
    if keep:
        notices.append("--resume keeps the run's " + ", ".join(f"{k} {stored[k]!r}" for k in keep)
                       + " (its data split and random streams; start a fresh run to change them)")
    for key in changed:
        if NOTICED.get(key):
            notices.append(f"--resume: {key} {stored[key]!r} -> {current[key]!r}: {NOTICED[key]}")
    return dataclasses.replace(configured, **keep) if keep else configured


def _keep_restart_allowance(configured: Config, stored: JSONObject, restart: JSONObject | None,
                            notices: list[str]) -> Config:
    """The allowance a run gave itself when it started again is part of the run: a command that
    still asks what it asked then (``restart["asked"]``) continues with the run's; one that asks
    for another allowance gets it, with the usual notice."""
    if not restart:
        return configured
    asked = restart.get("asked", {})
    keep = {key: stored[key] for key, value in asked.items()
            if key in stored and getattr(configured, key) == value and stored[key] != value}
    if not keep:
        return configured
    notices.append(f"--resume keeps the allowance this run took when it started again at step {restart['step']} "
                   "(its finest latent layer was unused): " + ", ".join(f"{k} {v!r}" for k, v in keep.items()))
    return dataclasses.replace(configured, **keep)

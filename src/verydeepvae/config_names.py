"""The original project's configuration key names (both its generations): the one table of renames
to ours (with the values that change meaning on the way), and the keys that have no effect here,
each with its reason.  ``config.normalise_keys`` applies them to every configuration source, and
the original interface (``legacy.py``) uses the same tables.
"""

from __future__ import annotations

from typing import Any

from .config_text import short_repr
from .errors import ConfigError

# Key names of the original project (both its generations) -> ours.
LEGACY_RENAMES = {
    "latents_per_channel": "latent_feature_maps_per_resolution",
    "nii_target_shape": "resolution",
    "nifti_flair_dir": "data_path",
    "nifti_dir": "data_path",
    "random_seed": "seed",
    "train_frac": "train_fraction",
    "gradient_clipping_value": "grad_clip",
    "gradient_skipping_value": "skip_threshold",
    "workers_per_process": "num_workers",
    "warmup_iterations": "skip_warmup_steps",
    "validation_period": "validation_period_epochs",
    "save_period": "checkpoint_period_epochs",
    "plot_recons_period": "figures_period_epochs",
    "resume_from_checkpoint": "resume",
    "veto_transformations": "augment",  # inverted, see legacy_value
    "half_precision": "precision",  # bool -> "half"/"fp32"
    "keep_every_checkpoint": "keep_checkpoints",  # bool -> 0 (all) / 3
    "convolutional_downsampling": "downsampling",  # bool -> "conv"/"avgpool"
    "output_folder": "output_dir",
    # the original's augmentation probabilities with a direct counterpart
    "prob_affine": "aug_prob_affine",
    "prob_three_d_elastic": "aug_prob_elastic",
    "prob_anisotroper": "aug_prob_anisotropy",
    "prob_haircut": "aug_prob_haircut",
}

# Keys the original accepted that have no effect here; each is reported with its reason.
LEGACY_IGNORED = {
    "verbose": "model summaries are printed by `verydeepvae config show`",
    "plot_gradient_norms": "gradient norms always go to TensorBoard",
    "normalise_weight_by_depth": "residual branches are always scaled by 1/sqrt(depth)",
    "zero_biases": "biases are always zero-initialised",
    "veto_batch_norm": "the model never uses batch norm",
    "use_rezero": "not implemented; depth-scaled initialisation is used instead",
    "use_precision_reweighting": "had no effect in the original either",
    "latents_to_optimise": "had no effect in the original either",
    "predict_x_scale": "the output likelihood always learns its per-voxel scale",
    "predict_x_scale_with_sigmoid": "stds use a softplus parameterisation",
    "scale_hidden_clamp_bounds": "stds use a softplus parameterisation",
    "scale_output_clamp_bounds": "stds use a softplus parameterisation",
    "variance_hidden_clamp_bounds": "stds use a softplus parameterisation",
    "variance_output_clamp_bounds": "stds use a softplus parameterisation",
    "output_activation_function": "the likelihood's mean is bounded to the data range",
    "use_tanh_output": "the likelihood's mean is bounded to the data range",
    "use_sigmoid_output": "the likelihood's mean is bounded to the data range",
    "separate_hidden_loc_scale_convs": "not implemented",
    "separate_output_loc_scale_convs": "not implemented",
    "latent_feature_maps_per_resolution_weight_sharing": "not implemented",
    "latents_per_channel_weight_sharing": "not implemented",
    "latents_to_use": "not implemented",
    "apply_augmentations_to_validation_set": "validation data are never augmented",
    "local_rank": "set by torchrun or --local_rank, not by the configuration",
    "checkpoint_folder": "checkpoints live in <output_dir>/checkpoints",
    "tensorboard_dir": "TensorBoard events live in <output_dir>/tensorboard",
    "recon_folder": "figures live in <output_dir>/figures",
    "model_name": "not used",
}


def legacy_value(key: str, value: Any) -> Any:
    """``value`` of the original key ``key`` as the value of the key it was renamed to."""
    if key == "nii_target_shape":
        if (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if len(set(value)) != 1:
                raise ConfigError(
                    f"nii_target_shape must be a cube such as [64, 64, 64], got {list(value)}"
                )
            return value[0]
        raise ConfigError(f"nii_target_shape must be a list of three equal integers, got {short_repr(value)}")
    if key in ("veto_transformations", "half_precision", "keep_every_checkpoint", "convolutional_downsampling"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {short_repr(value)}")
        return {
            "veto_transformations": not value,
            # the original's fp16 AMP, which it also ran on CPUs (its own tests do): "half" is fp16 on a
            # CUDA GPU and bf16 elsewhere, decided once the device is known (train/precision.py)
            "half_precision": "half" if value else "fp32",
            "keep_every_checkpoint": 0 if value else 3,
            "convolutional_downsampling": "conv" if value else "avgpool",
        }[key]
    return value

"""The original project's entry point: a ``run_autoencoder.py`` that defines ``hyper_params``.

Each configuration folder (``VeryDeepVAE_32x32x32/`` ...) holds a ``run_autoencoder.py`` with a
``hyper_params`` dictionary in the original key names and one call::

    sys.exit(run_from_hyper_params(hyper_params))

which accepts the original command-line flags of both generations of the project:

====================================  ===============================================================
``--CUDA_devices 0,1`` / ``0 1``      devices of this node (comma or space separated)
``--local_rank N`` / ``--local-rank``  accepted; torchrun's LOCAL_RANK wins when present
``--nifti_flair_dir D`` / ``--nifti_dir D``  the NIfTI folder (or a list file)
``--json_config_file F``              a JSON/YAML file of keys, applied over ``hyper_params``
``--output_dir D``                    default: ``output/`` next to the script
``--nifti_filename_pattern P``        e.g. ``'*FLAIR*.nii.gz'``
``--workers_per_process N``           DataLoader / preprocessing workers per process
``--threads_per_rank N``              torch threads per process
``--master_addr A --master_port P``   only used to start several local processes (see below)
====================================  ===============================================================

How many processes run:

* under ``torchrun`` / ``python -m torch.distributed.run`` (WORLD_SIZE in the environment): this
  process is one rank of the job; ``cuda:LOCAL_RANK`` of the listed devices, NCCL, or the CPU
  and gloo when there is no GPU;
* otherwise with one device in ``CUDA_devices``: a single process;
* otherwise (``python run_autoencoder.py --CUDA_devices 0,1`` without a launcher): the script
  starts itself again under torch's own launcher, exactly as
  ``python -m torch.distributed.run --standalone --nproc_per_node=2 run_autoencoder.py ...``
  (one process per listed device), with a one-line notice.

``CUDA_devices`` becomes ``CUDA_VISIBLE_DEVICES`` before CUDA initialises (indices into an
already set ``CUDA_VISIBLE_DEVICES``, e.g. from a cluster scheduler).  Without a GPU the run goes
on on the CPU with gloo and a one-line notice; devices that do not exist on a machine with GPUs
are one clear error (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import LEGACY_IGNORED, LEGACY_RENAMES, config_from_dict, normalise_keys, read_config_file
from .errors import ConfigError, UserError
from .json_types import JSONObject
from .train.distributed import configure_devices, physical_gpu_count, plan_devices  # noqa: F401

EXIT_USER_ERROR = 2

# Keys of the original run_autoencoder.py files (and of its later JSON schema) that have no
# counterpart here.  value: (reason, accepted values or None for any).  Values outside the
# accepted ones asked for something this implementation does not do, and are an error.
ORIGINAL_ONLY: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    # the run's plumbing, handled by this module, torchrun or the output folder
    "args": ("command-line flags are parsed by verydeepvae.legacy", None),
    "current_dir": ("outputs go to --output_dir (default: output/ next to the script)", None),
    "use_DDP": ("torch.distributed (DDP) is used whenever torchrun starts more than one process", None),
    "master_addr": ("the rendezvous is torchrun's (--master_addr / --rdzv_endpoint)", None),
    "master_port": ("the rendezvous is torchrun's (--master_port / --rdzv_endpoint)", None),
    "print_model": ("`verydeepvae config show` prints the model", None),
    "new_model": ("not used", None),
    "save_recons_to_mat": ("reconstructions are PNG figures; volumes are written as NIfTI", (False,)),
    "base_recons_on_train_loader": ("figures use validation volumes", (False,)),
    "shuffle_niftis": ("the file order is a seeded split, reshuffled every epoch", None),
    "nifti_standardise": ("intensities are always clamped to foreground percentiles and scaled to [0, 1]", (True,)),
    "discard_abnormally_small_niftis": ("unusable files stop the run, or are skipped with skip_bad_files", None),
    "affine_and_elastic_on_gpu": ("augmentation runs in the DataLoader workers", None),
    "generate_mask_for_validating": ("not implemented", (False,)),
    # what the model and likelihood are
    "likelihood": ("'Gaussian' is likelihood: gaussian here", None),  # translated below
    "use_abs_not_square": ("an L1 'likelihood' is not implemented", (False,)),
    "predict_x_var": ("the output likelihood always learns its per-voxel scale", (True,)),
    "predict_x_var_with_sigmoid": ("stds use a softplus parameterisation", None),
    "use_nii_data": ("only NIfTI volumes are supported (the 2D JPEG mode was removed)", (True,)),
    "sequence_type": ("FLAIR-like single-channel volumes", ("flair",)),
    "model_dwi_given_t1": ("conditional models are not implemented", (False,)),
    "model_b1000_given_b10": ("conditional models are not implemented", (False,)),
    "conditional_model": ("conditional models are not implemented", (False,)),
    "x_std_l2_penalty": ("not implemented", None),
    "kl_multiplier": ("use kl_warmup_steps for a KL warm-up", None),
    "KLs_to_use": ("not implemented", None),
    "veto_noise_injection": ("no noise injection", (True, False)),
    "noise_injection_multiplier": ("no noise injection", None),
    "model_posterior_as_perturbation_of_prior": ("not implemented", None),
    "optimise_encoder": ("every part of the model is trained", (True,)),
    "optimise_prior": ("every part of the model is trained", (True,)),
    "optimise_xmu": ("every part of the model is trained", (True,)),
    "optimise_xvar": ("every part of the model is trained", (True,)),
    "optimise_only_prior": ("every part of the model is trained", (False,)),
    "times_to_sample": ("`verydeepvae sample --num N`", None),
    "hidden_spatial_dims": ("derived from the layer definitions", None),
    "depth_override": ("derived from the layer definitions", None),
    "minimum_upper_hidden_bound": ("stds use a softplus parameterisation", None),
    "test_op": ("not used", None),
    "experimental_activate_chans_0_1_only": ("not implemented", (False,)),
    "do_not_use_bottleneck_in_last_block": ("not implemented", (False,)),
    "kl_weight_auto_adjustment": ("use kl_warmup_steps for a KL warm-up", (False,)),
    "kl_weight_adjustment_period": ("see kl_weight_auto_adjustment", None),
    "kl_weight_epoch_patience": ("see kl_weight_auto_adjustment", None),
    "kl_weight_max_multiplier": ("see kl_weight_auto_adjustment", None),
    "kl_weight_min_multiplier": ("see kl_weight_auto_adjustment", None),
    "kl_weight_multiplier_increment": ("see kl_weight_auto_adjustment", None),
    "kl_weight_percentile_to_reweight": ("see kl_weight_auto_adjustment", None),
    "kl_weight_verbose": ("see kl_weight_auto_adjustment", None),
    # masks, lesions and sub-volume experiments
    "apply_mask_in_input_space": ("not implemented", (False,)),
    "include_mask_in_loader": ("not implemented", (False,)),
    "mask_out_wmls_in_likelihood": ("not implemented", (False,)),
    "delete_hemispheres": ("not implemented", (False,)),
    "leave_random_subvolumes": ("not implemented", (False,)),
    "delete_random_subvolumes": ("not implemented", (False,)),
    "load_metadata": ("not implemented", (False,)),
    "biobank_eids_dir": ("not implemented", None),
    "crop_nii_at_loadtime": ("volumes are always cropped to the foreground (crop_to_foreground)", None),
    # augmentation: the aug_prob_* settings (prob_affine, prob_three_d_elastic, prob_anisotroper
    # are translated below); the original's magnitudes are replaced by mild fixed ranges
    "min_small_crop_size": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "rot_angle_in_rads": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "shear_angle_in_rads": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "translate_range": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "scale_range": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "three_d_deform_sigmas": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "three_d_deform_magnitudes": ("augmentation magnitudes are fixed and mild; probabilities are aug_prob_*", None),
    "histogram_shift_control_points": ("augmentation magnitudes are fixed and mild", None),
    "anisotroper_ranges": ("augmentation magnitudes are fixed and mild", None),
    "haircut_ranges": ("augmentation magnitudes are fixed and mild", None),
    "RandHistogramShift_num_control_points": ("augmentation magnitudes are fixed and mild", None),
    "RandHistogramShift_prob": ("use aug_prob_gamma for intensity augmentation", None),
    "RandScaleIntensity_factors": ("augmentation magnitudes are fixed and mild", None),
    "prob_torchvision_simple": ("use aug_prob_gamma / aug_prob_bias_field", None),
    "prob_torchvision_histogram": ("use aug_prob_gamma / aug_prob_bias_field", None),
    "prob_torchvision_complex": ("use aug_prob_gamma / aug_prob_bias_field", None),
    "prob_spiking": ("scanner artefacts are not simulated", None),
}

# --- command line ----------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train the configuration defined by this script's hyper_params (the original "
                               "interface of 3d_very_deep_vae); see the README's 'Distributed training'.")
    p.add_argument("--CUDA_devices", nargs="+", metavar="IDS",
                   help="CUDA devices of this node: 0,1,2 or 0 1 2 (default: hyper_params['CUDA_devices'], else 0)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="accepted for torch.distributed.launch; torchrun's LOCAL_RANK takes precedence")
    p.add_argument("--nifti_flair_dir", help="folder of NIfTI FLAIR volumes (or a text/CSV list of paths)")
    p.add_argument("--nifti_dir", help="same as --nifti_flair_dir (the later name)")
    p.add_argument("--nifti_filename_pattern", help="only files matching this glob, e.g. '*FLAIR*.nii.gz'")
    p.add_argument("--json_config_file", help="JSON or YAML file of configuration keys applied over hyper_params")
    p.add_argument("--output_dir", help="checkpoints, TensorBoard events, figures and samples "
                                        "(default: output/ next to the script)")
    p.add_argument("--master_addr", help="address for the rendezvous when this script starts several processes")
    p.add_argument("--master_port", type=int, help="port for the rendezvous when this script starts several processes")
    p.add_argument("--workers_per_process", type=int, help="DataLoader and preprocessing workers per process")
    p.add_argument("--threads_per_rank", type=int, help="torch CPU threads per process")
    return p


def parse_devices(values: Sequence[Any] | str | None) -> list[str] | None:
    """``['0,1']``, ``['0', '1']``, ``'0,1'``, ``[0, 1]`` -> ``['0', '1']``."""
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in str(value).replace(" ", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit():
                raise ConfigError(f"CUDA_devices must be device indices such as 0,1,2 or 0 1 2, got {part!r}")
            out.append(str(int(part)))
    if not out:
        raise ConfigError("CUDA_devices is empty; give device indices such as 0 or 0,1")
    if len(set(out)) != len(out):
        raise ConfigError(f"CUDA_devices lists a device twice: {','.join(out)}")
    return out


# --- hyper_params -> configuration -----------------------------------------------------------------


def translate(hyper_params: JSONObject) -> tuple[JSONObject, list[str]]:
    """Split ``hyper_params`` into configuration overrides and the names of ignored original keys.

    Keys with a counterpart are passed on (``config.build_config`` translates the original names);
    original keys without one are collected (reported in one notice); values that ask for
    something not implemented here are a ``ConfigError``.  Unknown keys are left for
    ``build_config`` to reject with a "did you mean".
    """
    overrides: JSONObject = {}
    ignored: list[str] = []
    for key, value in hyper_params.items():
        if key in ("CUDA_devices", "local_rank"):
            continue  # runtime settings, see run_from_hyper_params
        if key == "likelihood":
            if str(value).lower() != "gaussian" and value not in ("discretised_logistic",):
                raise ConfigError(f"likelihood {value!r} is not implemented; use 'Gaussian' (gaussian) or "
                                  "'discretised_logistic' (the default)")
            overrides["likelihood"] = "gaussian" if str(value).lower() == "gaussian" else value
            continue
        if key in ORIGINAL_ONLY:
            reason, accepted = ORIGINAL_ONLY[key]
            if accepted is not None and value not in accepted:
                raise ConfigError(f"hyper_params[{key!r}] = {value!r} is not supported: {reason}")
            ignored.append(key)
            continue
        if key in LEGACY_IGNORED:
            ignored.append(key)
            continue
        if isinstance(value, tuple):
            value = list(value)
        overrides[key] = value
    return overrides, ignored


def canonical_key(key: str) -> str:
    """The configuration field an original or current key name sets."""
    return LEGACY_RENAMES.get(key, key)


def merge_keys(base: JSONObject, update: JSONObject) -> JSONObject:
    """``base`` updated with ``update``; a key of ``update`` also replaces keys of ``base`` that set
    the same field under another name (e.g. ``resolution`` replaces ``nii_target_shape``)."""
    replaced = {canonical_key(k) for k in update}
    out = {k: v for k, v in base.items() if canonical_key(k) not in replaced}
    out.update(update)
    return out


def default_output_dir() -> str:
    """``output/`` next to the running script (as in the original's configuration folders)."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and Path(script).suffix == ".py" and Path(script).name != "__main__.py":
        return str(Path(script).resolve().parent / "output")
    return "output"


# --- launching -------------------------------------------------------------------------------------


def launcher_command(nproc: int, script: str, argv: Sequence[str], master_addr: str | None,
                     master_port: int | None) -> list[str]:
    """torch's own launcher for ``nproc`` local processes running ``script argv``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if master_addr or master_port:
        cmd += ["--nnodes=1", "--node_rank=0", f"--master_addr={master_addr or '127.0.0.1'}",
                f"--master_port={master_port or 29500}"]
    else:
        cmd += ["--standalone"]
    return cmd + [script, *argv]


def _exec(cmd: list[str]) -> None:  # pragma: no cover - replaced in tests
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ


def run_from_hyper_params(hyper_params: JSONObject, argv: Sequence[str] | None = None) -> int:
    """Train the configuration ``hyper_params`` (original key names) with the original flags.

    Returns the exit status: 0 when training finished, 2 for a user error (one line on stderr),
    128 + signal number when stopped by SIGINT/SIGTERM after saving the newest state.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(not a.strip() for a in argv):
        print("verydeepvae: error: an argument is only spaces: a line of the command probably ends with "
              "'\\ ' (backslash, space) instead of '\\' (a backslash just before the line break)", file=sys.stderr)
        return EXIT_USER_ERROR
    args = build_parser(prog=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else None).parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        return _run(dict(hyper_params), args, argv)
    except UserError as error:
        where = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"verydeepvae: error: {where}{error}", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_USER_ERROR))
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"verydeepvae: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("verydeepvae: interrupted", file=sys.stderr)
        return 130


def _run(hyper_params: JSONObject, args: argparse.Namespace, argv: list[str]) -> int:
    merged = dict(hyper_params)
    if args.json_config_file:
        merged = merge_keys(merged, read_config_file(args.json_config_file))
    data = args.nifti_flair_dir or args.nifti_dir
    if args.nifti_flair_dir and args.nifti_dir and args.nifti_flair_dir != args.nifti_dir:
        raise UserError("give --nifti_flair_dir or --nifti_dir, not both")
    flags = {"data_path": data, "output_dir": args.output_dir, "nifti_filename_pattern": args.nifti_filename_pattern,
             "num_workers": args.workers_per_process, "threads_per_rank": args.threads_per_rank}
    # a flag wins over the same setting in hyper_params or the JSON file, whatever its name there
    merged = merge_keys(merged, {k: v for k, v in flags.items() if v is not None})
    devices = parse_devices(args.CUDA_devices if args.CUDA_devices else merged.get("CUDA_devices", ["0"]))
    overrides, ignored = translate(merged)
    if not any(k in overrides for k in ("output_dir", "output_folder")):
        overrides["output_dir"] = default_output_dir()

    launched = _under_launcher()
    if launched and "LOCAL_RANK" not in os.environ and args.local_rank is not None:
        os.environ["LOCAL_RANK"] = str(args.local_rank)  # torch.distributed.launch without --use-env
    if not launched and args.local_rank not in (None, 0):
        raise UserError(f"--local_rank {args.local_rank} without torchrun: a single process is local rank 0; "
                        "start several with python -m torch.distributed.run --nproc_per_node=N")
    if not launched and len(devices) > 1:
        return _relaunch(devices, args, argv)

    device, device_notice = configure_devices(devices)
    notices: list[str] = []
    if device_notice:
        notices.append(device_notice)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cuda" and local_world < len(devices):
        notices.append(f"{local_world} process(es) on this node use {local_world} of the {len(devices)} listed "
                       f"CUDA_devices ({','.join(devices)}); start one per device with --nproc_per_node="
                       f"{len(devices)}")
    if ignored:
        notices.append(f"{len(ignored)} original hyper_params keys have no effect here and are ignored: "
                       f"{', '.join(sorted(ignored))}")
    if all(v is None for k, v in overrides.items() if canonical_key(k) == "data_path"):
        notices.append("no --nifti_flair_dir: training on the built-in phantom population")
    overrides["device"] = device
    overrides["CUDA_devices"] = devices
    cfg = config_from_dict(normalise_keys(overrides, notices, source="hyper_params"))

    from .train.loop import train

    result = train(cfg, notices=notices)
    if os.environ.get("RANK", "0") == "0" and result.checkpoint is not None:
        print(f"done: step {result.step}; checkpoint {result.checkpoint}; samples in {result.output_dir / 'samples'}")
    return 0


def _relaunch(devices: list[str], args: argparse.Namespace, argv: list[str]) -> int:
    """Several devices and no launcher: become torch's launcher with one process per device."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script or Path(script).suffix != ".py" or not Path(script).is_file():
        raise UserError(f"CUDA_devices {','.join(devices)} asks for {len(devices)} processes; start them with "
                        f"python -m torch.distributed.run --nproc_per_node={len(devices)} <script> ...")
    cmd = launcher_command(len(devices), str(Path(script).resolve()), argv, args.master_addr, args.master_port)
    print(f"verydeepvae: notice: {len(devices)} CUDA_devices: starting {len(devices)} processes with torch's "
          f"launcher, as `python -m torch.distributed.run --standalone --nproc_per_node={len(devices)} "
          f"{Path(script).name} ...`", file=sys.stderr)
    _exec(cmd)
    return 0  # not reached (exec), except where _exec is replaced

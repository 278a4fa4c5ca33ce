"""From a configuration to training and validation datasets (``build_datasets``).

The order of work, all before training starts so a bad file can never stop an epoch halfway:

1. the file list: ``split.json`` in the output folder if it exists (a resumed run uses exactly
   the same files), else discovery under ``data_path`` (or the built-in phantom population,
   generated once into the cache folder), capped by ``max_niis_to_use``;
2. the content hash of every file; files already in the cache are done (they were checked when
   they were preprocessed), the others get a quick header check (readable NIfTI, 3D or 4D with
   one volume, sane affine) and, if all pass, are preprocessed into the cache (in
   ``num_workers`` processes), which also catches unreadable voxel data and empty volumes;
3. bad files stop the run with one ``DataError`` listing them, or with ``skip_bad_files`` are
   left out, reported in ``notices`` and written to ``<output_dir>/skipped_files.txt``;
4. the seeded split, written to ``split.json`` (first run only);
5. with ``visualise_training_pipeline_before_starting``, ``pipeline_test/`` (on rank 0).

Afterwards a dataset item is one cache read (plus augmentation for the training set): no NIfTI
is decoded or resampled again, in this run or later ones with the same settings.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..atomic import current_umask, write_text
from ..console import bar
from ..errors import ConfigError, DataError
from . import discover
from .augment import AugmentSettings, Augmenter, sample_generator
from .cache import VolumeCache, file_digest, prepare_entry
from .nifti_load import IntensityReference, PreprocessSettings, VolumeMeta, open_image, preprocess_file

MAX_LISTED_PROBLEMS = 10


@dataclass
class DataBundle:
    train: "VolumeDataset"
    val: "VolumeDataset"
    voxel_size_mm: float  # isotropic voxel of the model's grid (median over training volumes)
    train_files: list[str]
    val_files: list[str]
    skipped_files: list[str]
    intensity_reference: IntensityReference
    data_source: str = ""
    cache_dir: str = ""
    split_file: str = ""
    notices: list[str] = field(default_factory=list)
    covariates: Any = None  # CovariateSchema of a conditional run (data/covariates.py), else None


class VolumeDataset(Dataset):
    """Preprocessed volumes from the cache; ``dataset[i]`` is a float32 (1, R, R, R) tensor in [0, 1]."""

    def __init__(
        self,
        files: Sequence[str],
        digests: Sequence[str],
        cache: VolumeCache,
        augmenter: Augmenter | None = None,
        metas: Sequence[VolumeMeta] | None = None,
    ):
        self.files = list(files)
        self.digests = list(digests)
        self.cache = cache
        self.augmenter = augmenter
        self.epoch_key: tuple[int, int, int] | None = None
        self.metas = list(metas) if metas is not None else [{} for _ in self.files]
        # (N, dim) float32 encoded covariates of a conditional run (data/covariates.py), else None
        self.covariates: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.files)

    def volume(self, index: int) -> np.ndarray:
        """The unaugmented preprocessed volume (R, R, R)."""
        digest = self.digests[index]
        try:
            return self.cache.load(digest)
        except Exception:  # entry deleted or damaged since the check: rebuild it from the source
            volume, meta = preprocess_file(self.files[index], self.cache.settings)
            return self.cache.store(digest, volume, meta)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(self.volume(index))[None]
        if self.augmenter is not None:
            x = self.augmenter(x, sample_generator(index, self.epoch_key))
        return x

    def set_epoch_key(self, seed: int, rank: int, epoch: int) -> None:
        """Tie augmentation randomness to (seed, rank, epoch, index): reproducible across resumes."""
        self.epoch_key = (seed, rank, epoch)


class WithCovariates(Dataset):
    """``(volume, covariates)`` items of a :class:`VolumeDataset` that has covariates: what the
    training DataLoader of a conditional run reads (batches of (B, 1, R, R, R) and (B, dim))."""

    def __init__(self, dataset: VolumeDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[index], self.dataset.covariates[index]

    def volume(self, index: int) -> np.ndarray:
        return self.dataset.volume(index)

    def set_epoch_key(self, seed: int, rank: int, epoch: int) -> None:
        self.dataset.set_epoch_key(seed, rank, epoch)


# --- the whole build -------------------------------------------------------------------------------


def build_datasets(cfg: Any, output_dir: str | Path, notices: list[str] | None = None,
                   show_progress: bool | None = None, is_main: bool = True) -> DataBundle:
    """Everything the training loop needs from the data (see the module notes); ``show_progress``
    False hides the bars of checking and preprocessing the files.  ``is_main``: this process is
    global rank 0 (or the only one): it alone writes the shared files (split.json, covariates.json,
    skipped_files.txt) and shows bars; the other ranks compute the same and read them."""
    notices = [] if notices is None else notices
    output_dir = Path(output_dir)
    show = show_progress if is_main else False
    settings = PreprocessSettings.from_config(cfg)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else output_dir / "cache"
    cache = VolumeCache(cache_root, settings)
    split_path = output_dir / discover.SPLIT_FILE
    seed = int(cfg.seed) if cfg.seed is not None else 0
    files, source, saved, phantom_root = _file_list(cfg, output_dir, split_path, cache_root, show, notices)
    conditioning = covariate_bad = None
    total = len(files)
    if getattr(cfg, "condition_on", None):  # before any preprocessing: a bad row writes nothing
        conditioning, covariate_bad = _conditioning(cfg, files, output_dir, phantom_root, saved is not None)
        files = [f for f in files if str(f) in conditioning[1]]
    prepared, bad = prepare_files(files, cache, workers=cfg.num_workers, show_progress=show,
                                  stop_early=not cfg.skip_bad_files)
    for meta in prepared.values():
        notices.extend(meta[1].get("warnings", []))
    bad = (covariate_bad or []) + bad
    if bad:
        _handle_bad(bad, total, cfg.skip_bad_files, output_dir, notices, write_report=is_main)
    good = [str(f) for f in files if str(f) in prepared]
    if not good:
        raise DataError(f"none of the {total} input files from {source} can be used")
    train_names, val_names = _split(cfg, good, saved, prepared, split_path, source, seed, is_main, notices)
    augmenter = None
    aug = AugmentSettings.from_config(cfg)
    if cfg.augment and aug.any():
        augmenter = Augmenter(aug, cfg.resolution)
    train = _dataset(train_names, prepared, cache, augmenter)
    val = _dataset(val_names, prepared, cache, None)
    schema = None
    if conditioning is not None:
        schema = _attach_covariates(conditioning, train, val, output_dir, seed, write=saved is None and is_main)
    bundle = DataBundle(
        train=train, val=val, voxel_size_mm=float(np.median([m["voxel_size_mm"] for m in train.metas])),
        train_files=list(train_names), val_files=list(val_names),
        skipped_files=[p for p, _ in bad] if bad else [], intensity_reference=_intensity_reference(train, settings),
        data_source=source, cache_dir=str(cache_root), split_file=str(split_path), notices=notices,
        covariates=schema,
    )
    if cfg.visualise_training_pipeline_before_starting and show is not False:  # rank 0 only
        from .pipeline_preview import write_pipeline_preview

        folder = write_pipeline_preview(bundle, output_dir, max(1, cfg.subjects_to_plot))
        notices.append(f"training pipeline preview written to {folder}")
    return bundle


def _file_list(cfg: Any, output_dir: Path, split_path: Path, cache_root: Path, show: bool | None,
               notices: list[str]) -> tuple[list[Path], str, tuple[list[str], list[str]] | None, Path | None]:
    """(the files, where they come from, the saved (train, validation) names of a split.json or
    None, the phantom population's folder or None)."""
    if split_path.exists():
        train_names, val_names, info = discover.load_split(split_path)
        files = [Path(f) for f in dict.fromkeys(train_names + val_names)]
        source = str(info.get("data_source", split_path))
        current = _describe_source(cfg)
        if current is not None and info.get("data_source") not in (None, current):
            notices.append(
                f"using the saved split {split_path} (made from {info.get('data_source')}), not {current}; "
                "delete it or use a new output_dir to split other data"
            )
        return files, source, (train_names, val_names), None
    root = Path(cfg.data_path).expanduser() if cfg.data_path else phantom_folder(cfg, cache_root, show)
    found = discover.discover_files(root, cfg.nifti_filename_pattern, exclude=[output_dir], notices=notices)
    return discover.cap_files(found, cfg.max_niis_to_use), str(root.resolve()), None, None if cfg.data_path else root


def _split(cfg: Any, good: list[str], saved: tuple[list[str], list[str]] | None, prepared: dict, split_path: Path,
           source: str, seed: int, is_main: bool, notices: list[str]) -> tuple[list[str], list[str]]:
    """(training, validation) names: a fresh seeded split (recorded in split.json by rank 0), or the
    saved one without the files that can no longer be used."""
    if saved is None:
        train_names, val_names = discover.split_keeping_copies_together(good, cfg.train_fraction, seed, notices)
        if is_main:  # other ranks compute the same split; rank 0 records it
            discover.save_split(split_path, train_names, val_names, {
                "data_source": source, "seed": seed, "train_fraction": cfg.train_fraction,
                "max_niis_to_use": cfg.max_niis_to_use, "nifti_filename_pattern": cfg.nifti_filename_pattern,
            })
    else:
        train_names = [f for f in saved[0] if f in prepared]
        val_names = [f for f in saved[1] if f in prepared]
        if not train_names:
            raise DataError(f"no training file of {split_path} can be used")
        if not val_names:
            val_names = train_names[:1]
            notices.append("no validation file of the saved split can be used; validating on a training file")
    if len(good) == 1:
        notices.append("only one usable input file: it is used for both training and validation")
    return train_names, val_names


def _intensity_reference(train: VolumeDataset, settings: PreprocessSettings) -> IntensityReference:
    """How model intensities map back to the data's scale: medians over the training files of the
    per-file clamp values (what ``--intensity data`` uses)."""
    metas = train.metas
    reference: IntensityReference = {
        "low": float(np.median([m["clamp_low"] for m in metas])),
        "high": float(np.median([m["clamp_high"] for m in metas])),
        "clamp_percentiles": list(settings.clamp_percentiles),
        "voxel_size_mm_range": [float(min(m["voxel_size_mm"] for m in metas)),
                                float(max(m["voxel_size_mm"] for m in metas))],
        "mapping": "data = low + model * (high - low); low/high are medians over training files of the "
                   "per-file intensity clamp values (0 maps to background)",
    }
    if settings.anchor_percentile is not None:
        reference["anchor_percentile"] = settings.anchor_percentile
    return reference


def _conditioning(cfg: Any, files: Sequence[Path | str], output_dir: Path, phantom_root: Path | None,
                  resumed: bool) -> tuple[tuple[Any, dict[str, dict]], list[tuple[str, str]]]:
    """((schema or the values' reader, raw values per file), scans without usable covariates): a
    resumed run's own covariates.json, else the covariate file (data/run_covariates.py)."""
    from . import run_covariates

    if resumed:
        loaded = run_covariates.load(output_dir)
        if loaded is None:
            raise DataError(f"{output_dir / run_covariates.COVARIATES_FILE} is missing: the run's covariates and "
                            "their standardisation cannot be restored. Restore the file, or start afresh with "
                            "--overwrite")
        schema, values = loaded
        missing = [str(f) for f in files if str(f) not in values]
        if missing:
            raise DataError(f"{output_dir / run_covariates.COVARIATES_FILE} has no covariates for {missing[0]}")
        return (schema, values), []
    found = run_covariates.for_files(cfg, files, phantom_root)
    return (found, found.values), list(found.problems)


def _attach_covariates(conditioning: tuple[Any, dict[str, dict]], train: "VolumeDataset", val: "VolumeDataset",
                       output_dir: Path, seed: int, write: bool) -> Any:
    """Encode the covariates of both sets (the schema from the training scans on a fresh run) and
    record them in covariates.json; returns the schema."""
    from . import run_covariates
    from .covariates import CovariateSchema

    source, values = conditioning
    schema = source if isinstance(source, CovariateSchema) else source.schema(train.files, seed)
    for dataset in (train, val):
        dataset.covariates = torch.from_numpy(schema.encode([values[f] for f in dataset.files]))
    if write:
        run_covariates.save(output_dir, schema, {f: values[f] for f in dict.fromkeys(train.files + val.files)})
    return schema


def _dataset(names: list[str], prepared: dict[str, tuple[str, dict]], cache: VolumeCache,
             augmenter: Augmenter | None) -> VolumeDataset:
    return VolumeDataset(names, [prepared[n][0] for n in names], cache, augmenter, [prepared[n][1] for n in names])


def _describe_source(cfg: Any) -> str | None:
    if cfg.data_path is None:
        return None
    return str(Path(cfg.data_path).expanduser().resolve())


def _handle_bad(bad: list[tuple[str, str]], total: int, skip: bool, output_dir: Path, notices: list[str],
                write_report: bool = True) -> None:
    listed = "\n".join(f"  {reason}" for _, reason in bad[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
    if not skip:
        if len(bad) == 1:
            raise DataError(f"{bad[0][1]} (set skip_bad_files: true, or --skip-bad-files, to leave bad files out)")
        raise DataError(
            f"{len(bad)} of {total} input files cannot be used (set skip_bad_files: true, or "
            f"--skip-bad-files, to leave them out):\n"
            f"{listed}{more}"
        )
    report = output_dir / "skipped_files.txt"
    if write_report:
        write_text(report, "".join(f"{path}\t{reason}\n" for path, reason in bad))
    for _, reason in bad[:MAX_LISTED_PROBLEMS]:
        notices.append(f"skipped bad file: {reason}")
    notices.append(f"skipped {len(bad)} of {total} input files; the list is in {report}")


# --- checking and preprocessing every file up front ------------------------------------------------


def prepare_files(
    files: Iterable[Path | str],
    cache: VolumeCache,
    workers: int = 1,
    show_progress: bool | None = None,
    stop_early: bool = False,
) -> tuple[dict[str, tuple[str, VolumeMeta]], list[tuple[str, str]]]:
    """Hash every file; check and preprocess the ones not in the cache yet.

    Returns ``{path: (content digest, metadata)}`` for usable files and ``[(path, reason)]`` for
    bad ones, in input order.  Bad files never raise here; the caller decides.  With
    ``stop_early``, a failed header check returns before any (long) preprocessing starts.
    """
    files = [str(f) for f in files]
    bad: dict[str, str] = {}
    digests: dict[str, str] = {}
    prepared: dict[str, tuple[str, VolumeMeta]] = {}
    todo: dict[str, str] = {}  # digest -> one path with that content
    for path in bar(files, desc="checking NIfTI files", unit="file", show=show_progress):
        try:
            digest = file_digest(path)
            meta = cache.read_meta(digest)
            if meta is not None:  # preprocessed (so checked) before: nothing to decode
                prepared[path] = (digest, meta)
                continue
            open_image(path)  # the quick header check, before any long preprocessing
        except DataError as error:
            bad[path] = str(error)
            continue
        except OSError as error:
            bad[path] = f"{path}: cannot be read ({error.strerror or error})"
            continue
        digests[path] = digest
        todo.setdefault(digest, path)

    if bad and stop_early:
        return prepared, [(p, bad[p]) for p in files if p in bad]
    if todo:
        cache.ensure_folder()
        results = _run_jobs(list(todo.items()), cache, workers, show_progress)
        for path, digest in digests.items():
            ok, value = results[digest]
            if ok:
                prepared[path] = (digest, value)
            else:
                bad[path] = value.replace(todo[digest], path, 1)
    ordered_bad = [(p, bad[p]) for p in files if p in bad]
    return prepared, ordered_bad


def _run_jobs(jobs: list[tuple[str, str]], cache: VolumeCache, workers: int,
              show_progress: bool | None) -> dict[str, tuple[bool, Any]]:
    shown = bar(total=len(jobs), desc="preprocessing volumes", unit="vol", show=show_progress)
    results: dict[str, tuple[bool, Any]] = {}
    workers = max(1, min(int(workers or 1), len(jobs), os.cpu_count() or 1))
    try:
        if workers == 1:
            for digest, path in jobs:
                results[digest] = prepare_entry(digest, path, cache)
                shown.update()
        else:
            # fork on Linux (like torch's DataLoader; the workers only run numpy/scipy/nibabel code,
            # never torch/OpenMP, so threads of the parent do not matter); spawn elsewhere.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(prepare_entry, digest, path, cache): digest for digest, path in jobs}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    shown.update()
    finally:
        shown.close()
    return results


# --- the built-in phantom population ----------------------------------------------------------------


def population_seed(cfg: Any) -> int:
    """The phantom population's seed: the run's seed, 0 for a random one (``seed: null`` varies the
    training, not the subjects)."""
    return int(cfg.seed) if cfg.seed is not None else 0


def phantom_folder(cfg: Any, cache_root: Path, show_progress: bool | None = None) -> Path:
    """The phantom population for this configuration, generated once (atomically) into the cache."""
    if cfg.phantom_num < 1:
        raise ConfigError("phantom_num must be >= 1 when data_path is not set (the built-in phantom data)")
    seed = population_seed(cfg)
    folder = cache_root / f"phantom_{cfg.resolution}_{cfg.phantom_num}_{seed}"
    if folder.is_dir():
        return folder
    from .phantom import generate_population  # lazy: only needed without data_path

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache_root))
    try:
        generate_population(cfg.phantom_num, cfg.resolution, tmp, seed, progress=show_progress)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folders are private (0700)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # someone else (another rank) finishing first is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder

#!/usr/bin/env python
"""Do a phantom-trained conditional model's samples and counterfactuals follow the requested covariates?

The statistics of issue 12's "Done when", from a trained run and held-out phantoms of another seed
(made in ``<output>/heldout`` when ``--heldout`` is not given):

    verydeepvae train --preset demo --condition-on age,lesion_load --set phantom_num=400 --output runs/cond_demo
    python bench/conditional.py --run runs/cond_demo --output runs/cond_demo/stats

1. **Extremes**: ``--per-group`` samples (32) asked for age 85 and as many for age 50 (other
   covariates drawn from the training scans given the age): ventricle volume and CSF fraction
   (``evaluate/morphometry.py``'s estimator, ml on the model grid), one-sided Mann-Whitney U
   (85 > 50); the criterion is p < 0.01.
2. **Sweep**: ``--per-point`` samples (8) at every age of ``--sweep`` (50:90:5): Spearman(requested
   age, measured ventricle volume) >= 0.5, and the least-squares slope within a factor 2 of the real
   slope, measured the same way on the held-out phantoms against their recorded ages.  The same for
   lesion load -> lesion volume when the model is conditioned on lesion_load (its sweep: the
   training scans' 5th to 95th percentile in 9 steps).  With guidance a sweep also has to stay
   realistic: the random-CNN Fréchet ratio of its samples to the held-out phantoms within 1.5x of
   the same requests' without guidance (strong guidance can meet a slope with volumes that are no
   longer brains).
3. **Counterfactual ageing** of ``--counterfactuals`` (16) held-out phantoms along the sweep (noise
   mode): the fraction of them whose ventricle volume rises monotonically (per-scan Spearman 1, and
   >= 0.9), the mean change per year beside the real slope, each scan's volumes and the largest fall
   between neighbouring ages (a small dip or a reversal?); identity: PSNR of the counterfactual at
   the scan's own age against the input, beside the PSNR of ``reconstruct``'s reconstruction.
   When the held-out scans are phantoms, the same scans' **true counterfactuals** (each re-rendered
   at every age with all else kept, ``evaluate/phantom_truth.py``) are measured the same way: the
   estimator's own monotonic fraction on the truth (the reference for the model's), the true change
   per year and its correlation with the model's over scans, and the PSNR against the true volumes.

Prints one table with the criteria and writes ``stats.json`` and two figures for the README:
``aged_50_to_90.png`` (the first held-out phantom aged along the sweep) and ``samples_by_age.png``
(samples per age group).  Nothing here is asserted anywhere; numbers move with the run and seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from verydeepvae.process_defaults import apply_cli_defaults

apply_cli_defaults()

from scipy import stats  # noqa: E402

from verydeepvae import viz  # noqa: E402
from verydeepvae.conditional import scan_covariates  # noqa: E402
from verydeepvae.data.phantom import generate_population  # noqa: E402
# a guided sweep passes only while its samples' Fréchet ratio stays within REALISM_TOLERANCE of the
# unguided samples' (the bound calibrate-guidance searches within; evaluate/calibration.py says why)
from verydeepvae.evaluate.calibration import REALISM_TOLERANCE  # noqa: E402
from verydeepvae.evaluate.phantom_truth import (monotonic_fraction, phantom_rows, psnr_against_truth,  # noqa: E402
                                               true_counterfactuals)
from verydeepvae.evaluate.conditional import (counterfactual_sweep, mann_whitney, measure, sample_at,  # noqa: E402
                                              sweep_points, trend)
from verydeepvae.errors import UserError  # noqa: E402
from verydeepvae.guidance import Guidance, resolve_guidance  # noqa: E402
from verydeepvae.generate import input_files, load_preprocessed, open_trained  # noqa: E402
from verydeepvae.metrics import psnr  # noqa: E402
from verydeepvae.train.quality import frechet_ratio  # noqa: E402
from verydeepvae.viz_conditional import save_counterfactual_strip, save_trend  # noqa: E402

SECOND_COVARIATE = {"lesion_load": "lesion_ml"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder or checkpoint of a model conditioned on age")
    parser.add_argument("--heldout", help="held-out phantom folder (default: made in <output>/heldout)")
    parser.add_argument("--heldout-num", type=int, default=64)
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--output", "--output-dir", dest="output_dir", required=True,
                        help="folder for stats.json and the figures")
    parser.add_argument("--ages", default="50,85", help="the two ages compared (default 50,85)")
    parser.add_argument("--per-group", type=int, default=32)
    parser.add_argument("--sweep", default="50:90:5", help="start:stop:step of the age sweep")
    parser.add_argument("--per-point", type=int, default=8)
    parser.add_argument("--counterfactuals", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance", default="auto",
                        help="covariate guidance of samples and counterfactuals: W, NAME=W pairs such as "
                             "age=2,lesion_load=5, calibrated (verydeepvae calibrate-guidance's: the samples' "
                             "and the counterfactuals' own), or auto: calibrated when measured, else 1 "
                             "(verydeepvae sample --guidance)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = open_trained(args.run, device=args.device)
    schema = trained.covariates
    if schema is None or "age" not in schema.names:
        print("bench/conditional.py: the model must be conditioned on age", file=sys.stderr)
        return 2
    try:
        guidance, _ = resolve_guidance(args.guidance, schema, trained.run_dir, trained.checkpoint.step, "--guidance")
        moved, _ = resolve_guidance(args.guidance, schema, trained.run_dir, trained.checkpoint.step, "--guidance",
                                    "counterfactuals")
    except UserError as error:
        print(f"bench/conditional.py: {error}", file=sys.stderr)
        return 2
    heldout_dir = Path(args.heldout) if args.heldout else out / "heldout"
    if not args.heldout and not (heldout_dir / "participants.tsv").is_file():
        generate_population(args.heldout_num, trained.resolution, heldout_dir, args.heldout_seed, progress=None)
    files = input_files(heldout_dir)
    rows, _ = scan_covariates(trained, files)
    volumes, _ = load_preprocessed(files, trained.preprocess_settings, desc="held-out phantoms")
    vox = trained.voxel_size_mm
    real = measure(volumes, vox)
    ages = np.array([float(r["age"]) for r in rows])
    result: dict = {"run": str(trained.checkpoint.path), "step": trained.checkpoint.step,
                    "heldout": str(heldout_dir), "num_heldout": len(files), "covariates": schema.names,
                    "temperature": args.temperature, "guidance": guidance.to_json(),
                    "counterfactual_guidance": moved.to_json(), "seed": args.seed}

    # 1. extremes
    low, high = (float(a) for a in args.ages.split(","))
    group, requested, _ = sample_at(trained, schema, "age", [low, high], args.per_group, args.temperature, args.seed,
                                    args.batch_size, guidance=guidance)
    table = measure(group, vox)
    req = np.asarray(requested, float)
    result["extremes"] = {}
    for key in ("ventricle_ml", "csf_fraction"):
        a, b = table[key][req == low], table[key][req == high]
        one_sided = float(stats.mannwhitneyu(b, a, alternative="greater").pvalue)
        result["extremes"][key] = {"ages": [low, high], "median": [float(np.median(a)), float(np.median(b))],
                                   "mann_whitney_p_one_sided": one_sided, "two_sided": mann_whitney(a, b),
                                   "passes": one_sided < 0.01}

    # 2. sweeps
    start, stop, step = (float(v) for v in args.sweep.split(":"))
    sweep = [float(v) for v in np.arange(start, stop + step / 2, step)]
    result["sweeps"] = {}
    sweeps = {"age": (sweep, "ventricle_ml")}
    for name, key in SECOND_COVARIATE.items():
        if name in schema.names:
            sweeps[name] = (sweep_points(schema, name, 9), key)
    sweep_samples = {}
    for name, (values, key) in sweeps.items():
        samples, requested, _ = sample_at(trained, schema, name, values, args.per_point, args.temperature,
                                          args.seed + 1, args.batch_size, guidance=guidance)
        measured = measure(samples, vox)
        realism = _realism(trained, schema, name, values, samples, volumes, guidance, args)
        own = np.array([float(r[name]) for r in rows])
        s, r = trend(requested, measured[key]), trend(own, real[key])
        ratio = s["slope"] / r["slope"] if s["slope"] is not None and r["slope"] else None
        result["sweeps"][name] = {"values": values, "measure": key, "samples": s, "real": r, "slope_ratio": ratio,
                                  "passes": bool(s["spearman"] is not None and s["spearman"] >= 0.5 and ratio is not None
                                                 and 0.5 <= ratio <= 2.0 and realism["still_brains"]),
                                  "csf_fraction": {"samples": trend(requested, measured["csf_fraction"]),
                                                   "real": trend(own, real["csf_fraction"])},
                                  "frechet_ratio": realism}
        save_trend(requested, measured[key], out / f"sweep_{name}.png", f"{name} (requested / own)", key,
                   real=(own, real[key]), title=f"{key} against {name}")
        sweep_samples[name] = (samples, requested, values)

    # 3. counterfactual ageing
    n = min(args.counterfactuals, len(files))
    per_scan, changes, own_psnr, recon_psnr, volumes_ml, counterfactuals, recons = [], [], [], [], [], [], []
    first = None
    for i in range(n):
        recon, outs = counterfactual_sweep(trained, schema, volumes[i], rows[i], "age", sweep, args.batch_size,
                                           moved)
        vent = measure(outs, vox)["ventricle_ml"]
        volumes_ml.append([float(v) for v in vent])
        per_scan.append(float(stats.spearmanr(sweep, vent)[0]) if np.ptp(vent) > 0 else 0.0)
        changes.append(float(np.polyfit(sweep, vent, 1)[0]))
        own_psnr.append(float(np.atleast_1d(psnr(volumes[i][None], recon[None]))[0]))
        plain = _reconstruct(trained, volumes[i], rows[i])
        recon_psnr.append(float(np.atleast_1d(psnr(volumes[i][None], plain[None]))[0]))
        if first is None:
            first = (volumes[i], recon, outs, rows[i]["age"])
        counterfactuals.append(outs)
        recons.append(recon)
    rho = np.array(per_scan)
    real_slope = result["sweeps"]["age"]["real"]["slope"]
    result["counterfactual"] = {
        "num_scans": n, "ages": sweep, "per_scan_spearman": per_scan,
        "fraction_monotonic": float(np.mean(rho >= 0.999)), "fraction_spearman_at_least_0.9": float(np.mean(rho >= 0.9)),
        "ventricle_ml_per_scan": volumes_ml,
        "largest_step_back_ml": float(max(0.0, -np.diff(np.asarray(volumes_ml), axis=1).min())),
        "mean_ventricle_change_ml_per_year": float(np.mean(changes)), "real_slope_ml_per_year": real_slope,
        "psnr_at_own_age_db": float(np.mean(own_psnr)), "psnr_reconstruct_db": float(np.mean(recon_psnr)),
        "truth": _truth(trained, files[:n], sweep, np.stack(counterfactuals), np.stack(recons), changes),
    }

    # figures for the README
    x, recon, outs, own_age = first
    save_counterfactual_strip([x, recon, *outs], ["held-out input", f"recon. (age {own_age:.0f})"] +
                              [f"age {a:g}" for a in sweep], recon, out / "aged_50_to_90.png",
                              suptitle="one held-out phantom, counterfactually aged (noise mode)")
    samples, requested, values = sweep_samples["age"]
    groups = [v for v in values if v % 10 == 0] or values
    viz.save_grid([[samples[j] for j, r in enumerate(requested) if r == v][:6] for v in groups],
                  out / "samples_by_age.png", row_titles=[f"age {v:g}" for v in groups])
    (out / "stats.json").write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    return 0


def _realism(trained, schema, name, values, samples, heldout, guidance, args) -> dict:
    """Whether the sweep's samples still look like the held-out phantoms: the random-CNN Fréchet
    ratio (train/quality.py; 1 = as close as real halves are to each other) of the guided samples,
    and of the same requests without guidance.  Strong guidance can meet a slope with volumes that
    are no longer brains (docs/conditional.md); this shows it."""
    out = {"guided": frechet_ratio(samples, heldout, trained.device, args.seed)["frechet_ratio"]}
    if guidance.scale(name) != 1.0:
        plain, _, _ = sample_at(trained, schema, name, values, args.per_point, args.temperature, args.seed + 1,
                                args.batch_size)
        out["unguided"] = frechet_ratio(plain, heldout, trained.device, args.seed)["frechet_ratio"]
    out["still_brains"] = bool(out["guided"] <= REALISM_TOLERANCE * out.get("unguided", out["guided"]))
    return out


def _truth(trained, files, ages: list[float], counterfactuals: np.ndarray, recons: np.ndarray,
           changes: list[float]) -> dict | None:
    """The same scans' true counterfactuals (the phantom re-rendered at each age, every other draw
    kept; evaluate/phantom_truth.py), measured the same way: how often the estimator itself reads
    the true ventricles as not rising at every step, the true change per year beside the model's
    (and their correlation over scans), and the PSNR of each counterfactual against the true volume
    beside that of the unchanged reconstruction (what a counterfactual that moved nothing would get).
    ``None`` when the held-out scans are not phantoms of this tool."""
    rows = phantom_rows(files)
    truth = None if rows is None else true_counterfactuals(rows, "age", ages, trained.preprocess_settings)
    if truth is None:
        return None
    vent = np.stack([measure(t, trained.voxel_size_mm)["ventricle_ml"] for t in truth])
    true_changes = [float(np.polyfit(ages, v, 1)[0]) for v in vent]
    moved, unchanged = psnr_against_truth(truth, counterfactuals, recons)
    return {"fraction_monotonic": monotonic_fraction(vent), "ventricle_ml_per_scan": vent.tolist(),
            "largest_step_back_ml": float(max(0.0, -np.diff(vent, axis=1).min())),
            "mean_ventricle_change_ml_per_year": float(np.mean(true_changes)),
            "change_correlation": float(np.corrcoef(changes, true_changes)[0, 1]) if len(changes) > 2 else None,
            "psnr_to_truth_db": moved, "psnr_unchanged_to_truth_db": unchanged}


def _reconstruct(trained, volume: np.ndarray, row: dict) -> np.ndarray:
    import torch

    c = torch.from_numpy(trained.covariates.encode([row])).to(trained.device)
    x = torch.from_numpy(volume)[None, None].to(trained.device)
    return trained.model.reconstruct(x, covariates=c).float().cpu()[0, 0].numpy()


def _print(r: dict) -> None:
    def f(v):
        return "n/a" if v is None else f"{v:.3g}"

    print(f"run {r['run']} (step {r['step']}), {r['num_heldout']} held-out phantoms in {r['heldout']}, "
          f"guidance {Guidance.from_json(r['guidance'])} (counterfactuals "
          f"{Guidance.from_json(r.get('counterfactual_guidance', r['guidance']))}), seed {r['seed']}")
    print("| criterion | measured | target | pass |")
    print("|---|---|---|---|")
    for key, e in r["extremes"].items():
        print(f"| {key}: age {e['ages'][1]:g} > age {e['ages'][0]:g} (medians {f(e['median'][1])} vs "
              f"{f(e['median'][0])}) | Mann-Whitney p {f(e['mann_whitney_p_one_sided'])} | p < 0.01 | "
              f"{'yes' if e['passes'] else 'NO'} |")
    for name, e in r["sweeps"].items():
        print(f"| {name} sweep -> {e['measure']}: Spearman / slope (real slope) | {f(e['samples']['spearman'])} / "
              f"{f(e['samples']['slope'])} ({f(e['real']['slope'])}, ratio {f(e['slope_ratio'])}) | >= 0.5, ratio "
              f"0.5-2 | {'yes' if e['passes'] else 'NO'} |")
        fd = e["frechet_ratio"]
        print(f"| {name} sweep samples: Fréchet ratio to the held-out phantoms (without guidance) | "
              f"{f(fd['guided'])} ({f(fd.get('unguided', fd['guided']))}) | <= {REALISM_TOLERANCE:g}x unguided | "
              f"{'yes' if fd['still_brains'] else 'NO'} |")
    c = r["counterfactual"]
    print(f"| counterfactual ageing, {c['num_scans']} scans: ventricles monotonic along the sweep | "
          f"{f(c['fraction_monotonic'])} (Spearman >= 0.9: {f(c['fraction_spearman_at_least_0.9'])}); "
          f"{f(c['mean_ventricle_change_ml_per_year'])} ml/year (real {f(c['real_slope_ml_per_year'])}); largest "
          f"step back {f(c['largest_step_back_ml'])} ml | 1 | |")
    print(f"| identity: PSNR at own age / reconstruct | {f(c['psnr_at_own_age_db'])} / {f(c['psnr_reconstruct_db'])} dB "
          "| equal | |")
    t = c.get("truth")
    if t:
        print(f"| the same scans' true counterfactuals, same measure: monotonic | {f(t['fraction_monotonic'])}; "
              f"{f(t['mean_ventricle_change_ml_per_year'])} ml/year (correlation with the model's per-scan change "
              f"{f(t['change_correlation'])}); largest step back {f(t['largest_step_back_ml'])} ml | reference | |")
        print(f"| counterfactuals against the true volumes: PSNR over the sweep (the unchanged reconstruction's) | "
              f"{f(t['psnr_to_truth_db'])} ({f(t['psnr_unchanged_to_truth_db'])}) dB | higher than unchanged | |")


if __name__ == "__main__":
    sys.exit(main())

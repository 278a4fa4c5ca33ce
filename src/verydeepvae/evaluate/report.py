"""Writing the report: ``report.json`` (machines), ``report.md`` (people) and ``figures/*.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import viz
from ..atomic import write_text, write_with

FIGURE_ROWS = 6


def write_report(report: dict[str, Any], arrays: dict[str, Any], output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    figures = output_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report["figures"] = write_figures(report, arrays, figures)
    write_text(output_dir / "report.json", json.dumps(_jsonable(report), indent=2, sort_keys=True) + "\n")
    write_text(output_dir / "report.md", markdown(report))


# --- figures --------------------------------------------------------------------------------------


def write_figures(report: dict[str, Any], arrays: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    samples, heldout, recon = arrays["samples"], arrays["heldout"], arrays["recon"]
    viz.save_montage(list(samples[:FIGURE_ROWS]), folder / "samples.png",
                     titles=[f"sample {i}" for i in range(min(FIGURE_ROWS, len(samples)))],
                     suptitle=f"prior samples, temperature {report['samples']['temperature']}")
    out["samples"] = "figures/samples.png"
    names = arrays["heldout_names"]
    viz.save_montage(list(heldout[:FIGURE_ROWS]), folder / "real.png", titles=names[:FIGURE_ROWS],
                     suptitle="held-out real volumes (preprocessed)")
    out["real"] = "figures/real.png"
    viz.save_side_by_side(list(heldout[:FIGURE_ROWS]), list(samples[:FIGURE_ROWS]), folder / "samples_vs_real.png",
                          "held-out real", f"samples (t={report['samples']['temperature']})")
    out["samples_vs_real"] = "figures/samples_vs_real.png"
    n = min(FIGURE_ROWS, len(heldout))
    viz.save_grid([[heldout[i], recon[i], np.abs(heldout[i] - recon[i])] for i in range(n)],
                  folder / "reconstructions.png", row_titles=names[:n],
                  col_titles=["input", "reconstruction", "|difference|"],
                  colorbar="model intensity (0 background, 1 upper clamp percentile); |difference| on the same scale")
    out["reconstructions"] = "figures/reconstructions.png"

    layers = report["likelihood"]["kl_per_layer"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(layers) + 1.5), 3.2))
    xs = np.arange(len(layers))
    ax.bar(xs, [layer["kl_bits_per_voxel"] for layer in layers], color="tab:blue")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{layer['index']}\n{layer['resolution']}³" for layer in layers], fontsize=7)
    ax.set_ylabel("KL, bits per image voxel")
    ax.set_xlabel("latent layer (coarsest first) and its resolution")
    for x, layer in zip(xs, layers):
        if "active_units" in layer:
            ax.annotate(f"{layer['active_units']}/{layer['units']}", (x, layer["kl_bits_per_voxel"]),
                        ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_title("KL per latent layer (labels: active / total units)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, folder / "kl_per_layer.png")
    out["kl_per_layer"] = "figures/kl_per_layer.png"

    mem = report.get("memorisation", {})
    if "voxels" in mem:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for ax, key in zip(axes, ("voxels", "random_cnn")):
            entry = mem[key]
            bins = np.histogram_bin_edges(entry["sample_distances"] + entry["heldout_distances"], bins=20)
            ax.hist(entry["heldout_distances"], bins=bins, alpha=0.6, label="held-out real -> train")
            ax.hist(entry["sample_distances"], bins=bins, alpha=0.6, label="sample -> train")
            ax.set_xlabel(f"nearest-training distance ({entry['space']})", fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("memorisation check: distance to the nearest training volume", fontsize=9)
        _save(fig, folder / "nearest_training.png")
        out["nearest_training"] = "figures/nearest_training.png"
    closest = arrays.get("closest")
    if closest is not None:
        rows = [[s, t] for s, t in zip(closest["samples"], closest["train"])]
        viz.save_grid(rows, folder / "closest_samples.png", col_titles=["sample", "nearest training"],
                      row_titles=[f"sample {i} (d={d:.2f})" for i, d in zip(closest["order"], closest["distances"])])
        out["closest_samples"] = "figures/closest_samples.png"

    tables = arrays.get("tables")
    if tables is not None:
        features = list(tables["real"])
        fig, axes = plt.subplots(2, math.ceil(len(features) / 2), figsize=(3.0 * math.ceil(len(features) / 2), 5.2))
        labels = report["morphometry"]["labels"]
        for ax, k in zip(np.ravel(axes), features):
            bins = np.histogram_bin_edges(np.concatenate([tables["real"][k], tables["samples"][k]]), bins=15)
            ax.hist(tables["real"][k], bins=bins, alpha=0.6, density=True, label="held-out real")
            ax.hist(tables["samples"][k], bins=bins, alpha=0.6, density=True, label="samples")
            ax.set_title(labels.get(k, k), fontsize=8)
            ax.set_xlabel("ml (model grid)", fontsize=7)
            ax.tick_params(labelsize=7)
        np.ravel(axes)[0].legend(fontsize=7)
        fig.suptitle("estimated tissue volumes", fontsize=9)
        _save(fig, folder / "tissue_volumes.png")
        out["tissue_volumes"] = "figures/tissue_volumes.png"
        if "check" in tables:
            est, rec = tables["check"]["estimated"], tables["check"]["recorded"]
            fig, axes = plt.subplots(1, len(est), figsize=(2.4 * len(est), 2.6))
            for ax, k in zip(np.ravel(axes), est):
                ax.scatter(rec[k], est[k], s=8)
                r = report["morphometry"]["estimator_check"]["features"][k]["pearson_r"]
                ax.set_title(f"{labels.get(k, k)}\nr = {r:.2f}", fontsize=7)
                ax.set_xlabel("recorded ml", fontsize=7)
                ax.tick_params(labelsize=6)
            np.ravel(axes)[0].set_ylabel("estimated ml", fontsize=7)
            _save(fig, folder / "estimator_check.png")
            out["estimator_check"] = "figures/estimator_check.png"
    if arrays.get("conditional"):
        from .conditional import write_figures as conditional_figures

        out.update(conditional_figures(report["conditional"], arrays["conditional"], folder))
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# --- text -----------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"


def _ms(stats: dict[str, Any], digits: int = 4) -> str:
    return f"{_f(stats['mean'], digits)} ± {_f(stats['std'], 2)}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few headline lines for the console."""
    lik, rec = report["likelihood"], report["reconstruction"]
    lines = [f"held-out negative ELBO: {_ms(lik['elbo_bits_per_voxel'])} bits/voxel "
             f"({_ms(lik['elbo_nats_per_voxel'])} nats/voxel) on {lik['num_volumes']} volumes",
             f"reconstruction: PSNR {_ms(rec['psnr_db'])} dB, SSIM {_ms(rec['ssim'])}, MAE {_ms(rec['mae'])}"]
    div = report["diversity"]
    if div.get("samples") and div.get("real"):
        lines.append(f"MS-SSIM between pairs: samples {_f(div['samples']['mean'])}, real {_f(div['real']['mean'])}")
    for name, entry in report["distances"].items():
        fr = entry["frechet"]
        if "samples_vs_real_half" in fr:
            lines.append(f"Fréchet distance on {entry['features']['label']}: samples {_f(fr['samples_vs_real_half'])} "
                         f"vs real-vs-real {_f(fr['real_vs_real'])} (sets of {fr['set_size']})")
    mem = report["memorisation"]
    if "voxels" in mem:
        lines.append(f"memorisation: median nearest-training distance ratio samples/held-out "
                     f"{_f(mem['voxels']['median_ratio'])} (voxels), {_f(mem['random_cnn']['median_ratio'])} (features)")
    if "conditional" in report:
        from .conditional import summary_lines as conditional_summary

        lines += conditional_summary(report["conditional"])
    return lines


def markdown(report: dict[str, Any]) -> str:
    m, d = report["model"], report["data"]
    lik, rec, div = report["likelihood"], report["reconstruction"], report["diversity"]
    figs = report.get("figures", {})
    out: list[str] = ["# Evaluation report", ""]
    out += [f"Checkpoint `{m['checkpoint']}` (step {m['step']}, {m['weights']} weights): {m['resolution']}³ model, "
            f"{m['parameters']:,} parameters, {m['latent_layers']} latent layers, likelihood `{m['likelihood']}`, "
            f"training voxel size {_f(m['voxel_size_mm'])} mm.",
            "",
            f"Held-out data: **{d['num_heldout']} volumes** from `{d['source']}` ({d['heldout_rule']}). "
            f"Training set for the memorisation check: {d['num_train']} files ({d['train_rule']}).",
            ""]
    out += [f"- {note}" for note in d["notes"]] + ([""] if d["notes"] else [])
    o = report["options"]
    prior = report["samples"].get("prior")
    out += [f"Samples: {report['samples']['num']} at temperature {report['samples']['temperature']}, seed "
            f"{o['seed']}" + (f", coarse latents from the {prior}" if prior else "") + f". Created {report['created']}; {report['timings_seconds']['total']} s on "
            f"{m['device']}; verydeepvae {report['software']['verydeepvae']}, torch {report['software']['torch']}.", ""]

    out += ["## Summary", "", "| measure | model / samples | reference |", "|---|---|---|"]
    out.append(f"| held-out negative ELBO, bits/voxel | {_ms(lik['elbo_bits_per_voxel'])} | "
               f"{'discrete likelihood: a true code length' if lik['discrete'] else 'continuous density: not a code length'} |")
    out.append(f"| reconstruction PSNR (dB) / SSIM / MAE | {_f(rec['psnr_db']['mean'])} / {_f(rec['ssim']['mean'])} / "
               f"{_f(rec['mae']['mean'])} | posterior mean, held-out |")
    if div.get("samples") and div.get("real"):
        out.append(f"| 3D MS-SSIM between pairs (diversity) | {_f(div['samples']['mean'])} | "
                   f"{_f(div['real']['mean'])} between real pairs |")
    for entry in report["distances"].values():
        label = entry["features"]["label"]
        for key, what in (("frechet", "Fréchet distance"), ("mmd", "MMD²")):
            e = entry[key]
            if "samples_vs_real_half" in e:
                out.append(f"| {what} on {label} (sets of {e['set_size']}) | {_f(e['samples_vs_real_half'])} | "
                           f"{_f(e['real_vs_real'])} real vs real |")
    mem = report["memorisation"]
    if "voxels" in mem:
        out.append(f"| nearest-training distance, median sample / median held-out (voxels) | "
                   f"{_f(mem['voxels']['median_ratio'])} | 1 = as novel as unseen real brains |")
    morph = report.get("morphometry", {})
    if "comparison" in morph:
        for k, e in morph["comparison"]["features"].items():
            if "samples_vs_real_half_ml" in e:
                out.append(f"| W1 distance, {morph['labels'][k]} volume (ml) | {_f(e['samples_vs_real_half_ml'])} | "
                           f"{_f(e['real_vs_real_half_ml'])} real vs real |")
    out.append("")

    out += ["## Likelihood", "", lik["statement"], "",
            f"Estimator: {lik['estimator']}. {lik['num_volumes']} held-out volumes.", "",
            "| quantity | nats/voxel | bits/voxel |", "|---|---|---|",
            f"| negative ELBO | {_ms(lik['elbo_nats_per_voxel'])} | {_ms(lik['elbo_bits_per_voxel'])} |",
            f"| reconstruction term | | {_ms(lik['reconstruction_bits_per_voxel'])} |",
            f"| KL (all layers) | | {_ms(lik['kl_bits_per_voxel'])} |", ""]
    units = lik.get("active_units")
    if units:
        out += [f"Active latent units: **{units['total_active']:,} of {units['total_units']:,}** "
                f"({100 * units['fraction_active']:.1f} %); {units['definition']}.", ""]
    if "kl_per_layer" in figs:
        out += [f"![KL per layer]({figs['kl_per_layer']})", ""]
    out += ["| layer | resolution | z shape | KL bits/voxel | KL nats (whole volume) | active units |",
            "|---|---|---|---|---|---|"]
    for layer in lik["kl_per_layer"]:
        active = f"{layer['active_units']} / {layer['units']}" if "active_units" in layer else "n/a"
        out.append(f"| {layer['index']} | {layer['resolution']}³ | {'×'.join(map(str, layer['shape']))} | "
                   f"{_f(layer['kl_bits_per_voxel'])} | {_f(layer['kl_nats_total'])} | {active} |")
    out.append("")

    out += ["## Reconstruction", "", f"{rec['latents']}; {rec['note']}.", "",
            "| | PSNR (dB) | SSIM | MAE |", "|---|---|---|---|",
            f"| whole volume | {_ms(rec['psnr_db'])} | {_ms(rec['ssim'])} | {_ms(rec['mae'])} |"]
    if "foreground" in rec:
        out.append(f"| foreground | {_ms(rec['foreground']['psnr_db'])} | | {_ms(rec['foreground']['mae'])} |")
    out += ["", f"![reconstructions]({figs.get('reconstructions', '')})", ""]

    out += ["## Samples and diversity", "", report["samples"]["note"] + ".", "",
            f"![held-out real volumes beside samples]({figs.get('samples_vs_real', '')})", "",
            f"![samples]({figs.get('samples', '')}) ![real]({figs.get('real', '')})", "", div["what"] + ".", ""]
    if div.get("samples") and div.get("real"):
        st = div["settings"]
        out += ["| pairs of | mean MS-SSIM | std | pairs |", "|---|---|---|---|"]
        for name in ("samples", "real"):
            e = div[name]
            out.append(f"| {name} | {_f(e['mean'])} | {_f(e['std'])} | {e['num_pairs']} |")
        out += ["", f"Settings for {'×'.join(map(str, st['volume_shape']))} volumes: {st['num_scales']} scales, "
                f"{st['kernel_size']}-voxel Gaussian window (sigma {st['kernel_sigma']}), weights "
                f"{', '.join(_f(w) for w in st['weights'])}: {st['note']}.", ""]

    out += ["## Distances between sample and real populations", "",
            "Each distance is computed on features z-scored with the pooled (held-out real + sample) statistics, between "
            "a random subset of samples and one random half of the real set, beside the same distance between "
            "the two real halves (sampling noise alone), averaged over random splits; the full-set value is also "
            "given. These use no downloaded weights and are **not FID**: the numbers are comparable only with "
            "figures computed by the same extractor and set sizes.", ""]
    out += ["| features | distance | samples vs real (half sets) | real vs real | ratio | samples vs real (all) |",
            "|---|---|---|---|---|---|"]
    for entry in report["distances"].values():
        for key, what in (("frechet", "Fréchet"), ("mmd", "MMD²")):
            e = entry[key]
            out.append(f"| {entry['features']['label']} | {what} | {_f(e.get('samples_vs_real_half'))} | "
                       f"{_f(e.get('real_vs_real'))} | {_f(e.get('ratio_to_baseline'), 3)} | "
                       f"{_f(e.get('samples_vs_real'))} |")
    out.append("")
    for entry in report["distances"].values():
        f = entry["features"]
        out.append(f"- **{f['label']}**: {f.get('note', '')}" + (f" (seed {f['seed']}, input {f['input_size']}³, "
                   f"channels {f['channels']}, {f['dim']} features)" if f["kind"] == "random_cnn" else ""))
    e0 = next(iter(report["distances"].values()))
    out += [f"- Fréchet: {e0['frechet']['definition']}. MMD: {e0['mmd']['definition']}.", ""]

    out += ["## Memorisation", ""]
    if "skipped" in mem:
        out += [f"Skipped: {mem['skipped']}.", ""]
    else:
        out += [mem["method"] + f". Training set: {mem['num_train']} volumes ({mem['train_rule']}).", "",
                "| space | median sample→train | median held-out→train | ratio | held-out 5th pct | "
                "samples below it | Mann-Whitney p (samples closer) |", "|---|---|---|---|---|---|---|"]
        for key in ("voxels", "random_cnn"):
            e = mem[key]
            out.append(f"| {e['space']} | {_f(e['median_sample'])} | {_f(e['median_heldout'])} | "
                       f"{_f(e['median_ratio'], 3)} | {_f(e['heldout_p5'])} | {_f(e['fraction_below_p5'], 3)} | "
                       f"{_f(e['mannwhitney_p'], 3)} |")
        out += ["", f"![nearest training distances]({figs.get('nearest_training', '')})",
                f"![closest samples]({figs.get('closest_samples', '')})", ""]

    out += ["## Tissue volumes", ""]
    if "skipped" in morph:
        out += [f"Skipped: {morph['skipped']}.", ""]
    else:
        out += [f"Method: {morph['method']}. Units: {morph['units']}.", "",
                "| volume | real mean ± sd (ml) | samples mean ± sd (ml) | W1 samples vs real (half sets) | "
                "W1 real vs real | W1 all samples vs all real (in real sd) |", "|---|---|---|---|---|---|"]
        for k, e in morph["comparison"]["features"].items():
            out.append(f"| {morph['labels'][k]} | {_f(e['real_mean_ml'])} ± {_f(e['real_sd_ml'], 3)} | "
                       f"{_f(e['samples_mean_ml'])} ± {_f(e['samples_sd_ml'], 3)} | "
                       f"{_f(e.get('samples_vs_real_half_ml'))} | {_f(e.get('real_vs_real_half_ml'))} | "
                       f"{_f(e['samples_vs_real_in_real_sd'], 3)} |")
        out += ["", f"![tissue volumes]({figs.get('tissue_volumes', '')})", ""]
        check = morph.get("estimator_check")
        if check:
            out += [f"Estimator check ({check['num_volumes']} volumes, `{check['participants_file']}`): "
                    f"{check['what']}.", "", "| volume | Pearson r | mean estimate (ml) | mean recorded (ml) |",
                    "|---|---|---|---|"]
            for k, e in check["features"].items():
                out.append(f"| {morph['labels'][k]} | {_f(e['pearson_r'], 3)} | {_f(e['mean_estimate_ml'])} | "
                           f"{_f(e['mean_recorded_ml'])} |")
            out += ["", f"![estimator check]({figs.get('estimator_check', '')})", ""]
    if "conditional" in report:
        from .conditional import markdown_lines as conditional_markdown

        out += conditional_markdown(report["conditional"], figs)
    out += ["## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in report["timings_seconds"].items()), ""]
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to None (JSON has no NaN/inf)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

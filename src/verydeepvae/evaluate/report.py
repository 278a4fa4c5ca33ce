"""Writing the report: ``report.json`` (machines), ``report.md`` (people) and ``figures/*.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import viz
from ..atomic import write_text, write_with
from ..sampling import DRAWN
from .population import DistancesSection, DiversitySection, MemorisationSection, MorphometrySection
from .conditional_section import ConditionalSection
from .sections import LikelihoodSection, ReconstructionSection
from .texture_section import TextureSection
from .text import num

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
    """Every figure of the report into ``folder``; returns name -> path relative to the report."""
    parts = sections(report)
    out = _volume_figures(report["samples"]["temperature"], arrays, folder, report["samples"].get("voxels", ""))
    out.update(_kl_figure(parts["likelihood"], folder))
    out.update(_memorisation_figures(parts["memorisation"], arrays.get("closest"), folder))
    if arrays.get("tables") is not None:
        out.update(_tissue_figures(parts["morphometry"], arrays["tables"], folder))
    if arrays.get("conditional"):
        from .conditional import write_figures as conditional_figures

        out.update(conditional_figures(parts["conditional"], arrays["conditional"], folder))
    return out


def _volume_figures(temperature: Any, arrays: dict[str, Any], folder: Path, voxels: str = "") -> dict[str, str]:
    """Samples (drawn ones beside their mean of p(x | z) when ``arrays["sample_means"]`` has them),
    held-out volumes, the two side by side, and reconstructions with their differences (``voxels``:
    how the samples' voxels came from p(x | z), named in the title when drawn)."""
    drawn = ", voxels drawn" if voxels.startswith(DRAWN) else ""
    samples, heldout, recon = arrays["samples"], arrays["heldout"], arrays["recon"]
    means = list(arrays.get("sample_means") or [])
    viz.save_samples_figure(list(samples[:FIGURE_ROWS]), means[:FIGURE_ROWS], folder / "samples.png",
                            [f"sample {i}" for i in range(min(FIGURE_ROWS, len(samples)))],
                            f"prior samples, temperature {temperature}{'' if means else drawn}")
    names = arrays["heldout_names"]
    viz.save_montage(list(heldout[:FIGURE_ROWS]), folder / "real.png", titles=names[:FIGURE_ROWS],
                     suptitle="held-out real volumes (preprocessed)")
    viz.save_side_by_side(list(heldout[:FIGURE_ROWS]), list(samples[:FIGURE_ROWS]), folder / "samples_vs_real.png",
                          "held-out real", f"samples (t={temperature}{drawn})")
    n = min(FIGURE_ROWS, len(heldout))
    viz.save_grid([[heldout[i], recon[i], np.abs(heldout[i] - recon[i])] for i in range(n)],
                  folder / "reconstructions.png", row_titles=names[:n],
                  col_titles=["input", "reconstruction", "|difference|"],
                  colorbar="model intensity (0 background, 1 upper clamp); |difference| on the same scale")
    return {name: f"figures/{name}.png" for name in ("samples", "real", "samples_vs_real", "reconstructions")}


def _kl_figure(likelihood: LikelihoodSection, folder: Path) -> dict[str, str]:
    import matplotlib.pyplot as plt

    layers = likelihood.kl_per_layer
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
    return {"kl_per_layer": "figures/kl_per_layer.png"}


def _memorisation_figures(memorisation: MemorisationSection, closest: dict[str, Any] | None,
                          folder: Path) -> dict[str, str]:
    import matplotlib.pyplot as plt

    out = {}
    if memorisation.skipped is None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for ax, key in zip(axes, memorisation.SPACES):
            entry = memorisation.spaces[key]
            bins = np.histogram_bin_edges(entry["sample_distances"] + entry["heldout_distances"], bins=20)
            ax.hist(entry["heldout_distances"], bins=bins, alpha=0.6, label="held-out real -> train")
            ax.hist(entry["sample_distances"], bins=bins, alpha=0.6, label="sample -> train")
            ax.set_xlabel(f"nearest-training distance ({entry['space']})", fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("memorisation check: distance to the nearest training volume", fontsize=9)
        _save(fig, folder / "nearest_training.png")
        out["nearest_training"] = "figures/nearest_training.png"
    if closest is not None:
        rows = [[s, t] for s, t in zip(closest["samples"], closest["train"])]
        viz.save_grid(rows, folder / "closest_samples.png", col_titles=["sample", "nearest training"],
                      row_titles=[f"sample {i} (d={d:.2f})" for i, d in zip(closest["order"], closest["distances"])])
        out["closest_samples"] = "figures/closest_samples.png"
    return out


def _tissue_figures(morph: MorphometrySection, tables: dict[str, Any], folder: Path) -> dict[str, str]:
    import matplotlib.pyplot as plt

    features = list(tables["real"])
    fig, axes = plt.subplots(2, math.ceil(len(features) / 2), figsize=(3.0 * math.ceil(len(features) / 2), 5.2))
    labels = morph.labels
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
    out = {"tissue_volumes": "figures/tissue_volumes.png"}
    if "check" in tables:
        est, rec = tables["check"]["estimated"], tables["check"]["recorded"]
        fig, axes = plt.subplots(1, len(est), figsize=(2.4 * len(est), 2.6))
        for ax, k in zip(np.ravel(axes), est):
            ax.scatter(rec[k], est[k], s=8)
            r = morph.estimator_check["features"][k]["pearson_r"]
            ax.set_title(f"{labels.get(k, k)}\nr = {r:.2f}", fontsize=7)
            ax.set_xlabel("recorded ml", fontsize=7)
            ax.tick_params(labelsize=6)
        np.ravel(axes)[0].set_ylabel("estimated ml", fontsize=7)
        _save(fig, folder / "estimator_check.png")
        out["estimator_check"] = "figures/estimator_check.png"
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


# --- text -----------------------------------------------------------------------------------------


def sections(report: dict[str, Any]) -> dict[str, Any]:
    """The typed sections of a report (its JSON form in, see ``sections.py`` and ``population.py``)."""
    return {"likelihood": LikelihoodSection.from_json(report["likelihood"]),
            "reconstruction": ReconstructionSection.from_json(report["reconstruction"]),
            "diversity": DiversitySection.from_json(report["diversity"]),
            "texture": TextureSection.from_json(report.get("texture")),
            "distances": DistancesSection.from_json(report["distances"]),
            "memorisation": MemorisationSection.from_json(report["memorisation"]),
            "morphometry": MorphometrySection.from_json(report.get("morphometry", {"skipped": "not computed"})),
            **({"conditional": ConditionalSection.from_json(report["conditional"])} if "conditional" in report else {})}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few headline lines for the console."""
    parts = sections(report)
    lines = [line for name in ("likelihood", "reconstruction", "diversity", "texture", "distances", "memorisation")
             for line in parts[name].console_lines()]
    if "conditional" in parts:
        lines += parts["conditional"].console_lines()
    return lines


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was evaluated, a summary table, then each section and the timings."""
    parts = sections(report)
    figures = report.get("figures", {})
    out = _header(report) + ["## Summary", "", "| measure | model / samples | reference |", "|---|---|---|"]
    for name in ("likelihood", "reconstruction", "diversity", "texture", "distances", "memorisation", "morphometry"):
        out += parts[name].summary_rows()
    out.append("")
    out += parts["likelihood"].markdown(figures) + parts["reconstruction"].markdown(figures)
    samples = report["samples"]
    out += ["## Samples and diversity", "", samples["note"] + ".", "",
            f"![held-out real volumes beside samples]({figures.get('samples_vs_real', '')})", "",
            f"![samples]({figures.get('samples', '')}) ![real]({figures.get('real', '')})", "",
            parts["diversity"].what + ".", ""]
    out += parts["diversity"].markdown() + parts["texture"].markdown() + parts["distances"].markdown()
    out += parts["memorisation"].markdown(figures) + parts["morphometry"].markdown(figures)
    if "conditional" in parts:
        out += parts["conditional"].markdown(figures)
    out += ["## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in report["timings_seconds"].items()), ""]
    return "\n".join(out)


def _header(report: dict[str, Any]) -> list[str]:
    """The lines before the summary: the checkpoint, the held-out data, the samples, when and where."""
    m, d, o = report["model"], report["data"], report["options"]
    out = ["# Evaluation report", "",
           f"Checkpoint `{m['checkpoint']}` (step {m['step']}, {m['weights']} weights): {m['resolution']}³ model, "
           f"{m['parameters']:,} parameters, {m['latent_layers']} latent layers, likelihood `{m['likelihood']}`, "
           f"training voxel size {num(m['voxel_size_mm'])} mm.",
           "",
           f"Held-out data: **{d['num_heldout']} volumes** from `{d['source']}` ({d['heldout_rule']}). "
           f"Training set for the memorisation check: {d['num_train']} files ({d['train_rule']}).",
           ""]
    out += [f"- {note}" for note in d["notes"]] + ([""] if d["notes"] else [])
    prior = report["samples"].get("prior")
    return out + [
        f"Samples: {report['samples']['num']} at temperature {report['samples']['temperature']}, seed "
        f"{o['seed']}" + (f", coarse latents from the {prior}" if prior else "") + f". Created {report['created']}; "
        f"{report['timings_seconds']['total']} s on {m['device']}; verydeepvae {report['software']['verydeepvae']}, "
        f"torch {report['software']['torch']}.", ""]


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

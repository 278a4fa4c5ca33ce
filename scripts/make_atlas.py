#!/usr/bin/env python
"""Rebuild the packaged tissue atlas from the MNI ICBM152 2009 files that nilearn ships.

    python scripts/make_atlas.py            # writes src/verydeepvae/atlas/mni152_2009_tissue.nii.gz
    python scripts/make_atlas.py --preview atlas.png

Needs nilearn, the optional extra (``pip install "verydeepvae[atlas]"``; nothing else in the
package uses it, the built atlas ships with the package). Reads
nilearn/datasets/data/mni_icbm152_{gm,wm,t1}_tal_nlin_sym_09a_converted.nii.gz from the
installed nilearn (nothing is downloaded), derives CSF and lateral-ventricle maps, crops to the
brain, block-averages to 2 mm and stores uint8 fractions (see verydeepvae.data.atlas). The
template's copyright notice is in src/verydeepvae/atlas/NOTICE and must travel with the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from verydeepvae.atomic import write_with
from verydeepvae.data.atlas import ATLAS_FILENAME, CHANNELS, DEFAULT_VOXEL_MM, build_atlas
from verydeepvae.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "src" / "verydeepvae" / "atlas" / ATLAS_FILENAME)
    parser.add_argument("--voxel-mm", type=float, default=DEFAULT_VOXEL_MM)
    parser.add_argument("--preview", type=Path, default=None, help="also write a PNG montage")
    args = parser.parse_args(argv)

    try:
        data, affine = build_atlas(args.voxel_mm)
    except DataError as error:  # e.g. nilearn, the optional [atlas] extra, is not installed
        print(f"make_atlas: error: {error}", file=sys.stderr)
        return 2
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=4)  # 4 = MNI152 space
    image.set_sform(affine, code=4)
    image.header["descrip"] = b"ICBM152 2009a sym: " + ",".join(CHANNELS).encode() + b" (x/255)"
    write_with(args.out, lambda tmp: nib.save(image, str(tmp)))
    fractions = data.astype(np.float32) / 255.0
    ml = fractions.sum(axis=(0, 1, 2)) * args.voxel_mm**3 / 1000.0
    summary = ", ".join(f"{name} {v:.0f} ml" for name, v in zip(CHANNELS, ml))
    print(f"wrote {args.out} shape {data.shape} ({args.out.stat().st_size / 1e6:.2f} MB): {summary}")
    if args.preview is not None:
        from verydeepvae.viz import save_montage

        save_montage([fractions[..., i] for i in range(len(CHANNELS))], args.preview, titles=list(CHANNELS),
                     colorbar="tissue fraction of the voxel")
        print(f"wrote {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation report: how good is a trained model, measured offline on held-out volumes.

``run_evaluation(trained, data_path, output_dir, options)`` writes ``report.json``, ``report.md``
and ``figures/*.png`` (``verydeepvae evaluate`` on the command line). Sections:

* likelihood: held-out negative ELBO in nats and bits per voxel (a true code length under the
  discretised likelihood), its reconstruction and KL terms, KL per latent layer, active units;
* reconstruction: PSNR, SSIM and MAE of posterior-mean reconstructions;
* diversity: 3D MS-SSIM between pairs of samples beside pairs of real volumes (size-valid settings);
* distances: Fréchet distance and MMD on weight-free features (a fixed-seed random 3D CNN and
  intensity statistics; optionally a user plug-in), each beside a real-vs-real baseline; never FID;
* memorisation: each sample's distance to its nearest training volume beside held-out volumes';
* tissue volumes (phantom / FLAIR-like data): GM, WM, CSF, ventricles, lesions of samples and real
  volumes, Wasserstein distances beside the real-vs-real baseline, and the estimator's recovery
  of the phantom's recorded volumes.

Which files are held out: :mod:`verydeepvae.evaluate.data`.
"""

from .data import EvaluationData, select_data
from .run import EvaluationOptions, Report, compute_report, run_evaluation

__all__ = ["EvaluationData", "EvaluationOptions", "Report", "compute_report", "run_evaluation", "select_data"]

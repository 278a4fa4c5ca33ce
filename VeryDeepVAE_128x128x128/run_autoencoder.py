"""Train the 128x128x128 model of the original 3d_very_deep_vae project (its hyper_params).

    python VeryDeepVAE_128x128x128/run_autoencoder.py --CUDA_devices 0 --local_rank 0 --nifti_flair_dir DIR
    python -m torch.distributed.run --nnodes=1 --nproc_per_node=8 VeryDeepVAE_128x128x128/run_autoencoder.py \\
        --CUDA_devices 0,1,2,3,4,5,6,7 --nifti_flair_dir DIR

To make a new configuration, copy this folder and edit hyper_params (original key names; see the
README).  Outputs go to output/ next to this file unless --output_dir is given.
"""

import sys

from verydeepvae.legacy import run_from_hyper_params

hyper_params = {'total_epochs': 10, 'batch_size': 1, 'learning_rate': 1e-3, 'l2_reg_coeff': 1e-4,
                'train_frac': 0.95, 'random_seed': 1504607023, 'half_precision': False}

# Layer definitions: one entry per resolution level, 128^3 first (see "Layer definitions")
hyper_params['latents_per_channel'] = [2, 7, 6, 5, 4, 3, 2, 1]
hyper_params['channels_per_latent'] = [20, 20, 20, 20, 20, 20, 20, 200]
hyper_params['channels'] = [20, 40, 60, 80, 100, 120, 140, 160]
hyper_params['kernel_sizes_bottom_up'] = [3, 3, 3, 3, 3, 3, 2, 1]
hyper_params['kernel_sizes_top_down'] = [3, 3, 3, 3, 3, 3, 2, 1]
hyper_params['channels_hidden'] = hyper_params['channels']
hyper_params['channels_top_down'] = hyper_params['channels']
hyper_params['channels_hidden_top_down'] = hyper_params['channels_hidden']

# Peak GPU memory is about 32 GB at batch_size 1.  If that is too much, use 6 instead of 7
# latent layers at 64^3: hyper_params['latents_per_channel'] = [2, 6, 6, 5, 4, 3, 2, 1]

hyper_params['nii_target_shape'] = [128, 128, 128]
hyper_params['nifti_flair_dir'] = None  # or --nifti_flair_dir; None: the built-in phantom population
# hyper_params['max_niis_to_use'] = 200  # a shorter epoch, e.g. to check the figures quickly
hyper_params['visualise_training_pipeline_before_starting'] = True
hyper_params['subjects_to_plot'] = 4
hyper_params['validation_period'] = 1
hyper_params['save_period'] = 1
hyper_params['plot_recons_period'] = 1
hyper_params['resume_from_checkpoint'] = False
hyper_params['workers_per_process'] = 20
hyper_params['CUDA_devices'] = ['0']  # or --CUDA_devices 0,1,...

if __name__ == '__main__':
    sys.exit(run_from_hyper_params(hyper_params))

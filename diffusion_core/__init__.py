"""diffusion_core: the thesis's DDPM in plain PyTorch (no Ray, no MLflow).

    from diffusion_core import train, TrainConfig, DataConfig
    result = train(data=DataConfig(root="../shared/data", subset_size=2000),
                   training=TrainConfig(epochs=1), progress=True)
"""
from .data import (DATA_ROOT_ENV, DataConfig, DatasetNotFoundError, ImageSet, Splits, cifar10_splits,
                   epoch_batches, from_unit_range, load_cifar10, load_mnist, load_splits, mnist_splits,
                   resolve_data_root, subset_indices, to_unit_range)
from .ema import EMA
from .gaussian import GaussianToy
from .losses import diffusion_loss, per_example_mse
from .residuals import default_t_grid, residual_curve
from .samplers import DDIMSampler, DDPMSampler, make_sampler
from .schedules import SCHEDULES, NoiseSchedule, ScheduleConfig, make_betas
from .train import (DiffusionConfig, DivergedError, EpochLosses, TrainConfig, TrainContext, TrainResult, TrainState, train,
                    validation_loss)
from .unet import UNet, UNetConfig, count_parameters

__version__ = "0.1.0"

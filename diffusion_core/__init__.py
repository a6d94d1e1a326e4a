"""diffusion_core: the thesis's DDPM in plain PyTorch (no Ray, no MLflow).

    from diffusion_core import train, TrainConfig, DataConfig
    result = train(data=DataConfig(root="../shared/data", subset_size=2000),
                   training=TrainConfig(epochs=1), progress=True)

The names below are imported on first use (PEP 562), so that `diffusion_core.config` -- the
configs a study file is checked against -- can be imported without torch.

    config.py, capabilities.py   the configs and what each training path honours (no torch)
    data.py, molrg.py            MNIST / CIFAR-10 splits and subsets; the mixture of low-rank Gaussians
    model/                       the U-Net, and K of them stacked into one model
    diffusion/                   schedules, losses, the learned variance, guidance, the samplers
    training/                    the one training loop (engine.py): a run alone or K stacked
    evaluation.py, residuals.py, metrics/   one evaluation: Residual(t), samples, FID / IS / P-R
    estimators/                  the bias/variance decomposition, memorization, the Gaussian toy
"""
import importlib

_EXPORTS = {
    "config": ("DATA_ROOT_ENV", "DataConfig", "DiffusionConfig", "EvalConfig", "ScheduleConfig", "TrainConfig",
               "UNetConfig", "resolve_data_root"),
    "data": ("DatasetNotFoundError", "ImageSet", "Splits", "cifar10_splits", "epoch_batches", "from_unit_range",
             "load_cifar10", "load_mnist", "load_splits", "mnist_splits", "subset_indices", "to_unit_range"),
    "diffusion.losses": ("diffusion_loss", "per_example_mse"),
    "diffusion.samplers": ("DDIMSampler", "DDPMSampler", "make_sampler"),
    "diffusion.schedules": ("SCHEDULES", "NoiseSchedule", "make_betas"),
    "estimators.gaussian": ("GaussianToy",),
    "model.unet": ("UNet", "count_parameters"),
    "residuals": ("default_t_grid", "residual_curve"),
    "training.ema": ("EMA",),
    "training.engine": ("DivergedError", "EpochLosses", "TrainContext"),
    "training.train": ("TrainResult", "TrainState", "train"),
    "training.validation": ("validation_loss",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusion_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


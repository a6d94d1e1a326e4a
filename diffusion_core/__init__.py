"""diffusion_core: the thesis's DDPM in plain PyTorch (no Ray, no MLflow).

    from diffusion_core import train, TrainConfig, DataConfig
    result = train(data=DataConfig(root="../shared/data", subset_size=2000),
                   training=TrainConfig(epochs=1), progress=True)

The names below are imported on first use (PEP 562), so that `diffusion_core.config` -- the
configs a study file is checked against -- can be imported without torch.
"""
import importlib
import sys
import types

_EXPORTS = {
    "config": ("DATA_ROOT_ENV", "DataConfig", "DiffusionConfig", "EvalConfig", "ScheduleConfig", "TrainConfig",
               "UNetConfig", "resolve_data_root"),
    "data": ("DatasetNotFoundError", "ImageSet", "Splits", "cifar10_splits", "epoch_batches", "from_unit_range",
             "load_cifar10", "load_mnist", "load_splits", "mnist_splits", "subset_indices", "to_unit_range"),
    "ema": ("EMA",),
    "engine": ("DivergedError", "EpochLosses", "TrainContext"),
    "gaussian": ("GaussianToy",),
    "losses": ("diffusion_loss", "per_example_mse"),
    "residuals": ("default_t_grid", "residual_curve"),
    "samplers": ("DDIMSampler", "DDPMSampler", "make_sampler"),
    "schedules": ("SCHEDULES", "NoiseSchedule", "make_betas"),
    "train": ("TrainResult", "TrainState", "train"),
    "unet": ("UNet", "count_parameters"),
    "validation": ("validation_loss",),
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


class _Package(types.ModuleType):
    """`diffusion_core.train` is the function, as `from diffusion_core import train` promises: importing the
    submodule diffusion_core.train would otherwise bind the package's `train` to the module."""

    @property
    def train(self):
        return importlib.import_module(".train", __name__).train

    @train.setter
    def train(self, module):  # the import system binding the submodule: the name stays the function
        pass


sys.modules[__name__].__class__ = _Package

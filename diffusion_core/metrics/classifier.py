"""The MNIST feature network: a reduced ResNet-18 that plays Inception's part on MNIST.

Architecture (thesis: "a reduced ResNet-18"): BasicBlocks 2-2-2-2 with widths
16-32-64-128, a 3x3 stride-1 stem and no max-pool (28x28 input is already small),
stages at 28, 14, 7 and 4 pixels, global average pooling to a 128-d vector (the
"features", the role of Inception's pool3) and one linear layer to 10 logits
(softmax = p(y|x)). Inputs are images in [-1, 1] (uint8 images are scaled on the fly).

The shipped weights live next to this file (mnist_classifier.pt, state_dict only) with
their provenance (mnist_classifier.json: sha256, seed, epochs, test accuracy, command).
`load_classifier()` checks the sha256 before loading; `train_classifier()` regenerates
them deterministically from the 48,000-image training split (never val/test; the test
set is only used once at the end to report accuracy).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import write_bytes
from ..data import ImageSet, mnist_splits, to_unit_range
from ..model.unet import count_parameters

WEIGHTS_PATH = Path(__file__).with_name("mnist_classifier.pt")
PROVENANCE_PATH = Path(__file__).with_name("mnist_classifier.json")
DEFAULT_WIDTHS = (16, 32, 64, 128)
REGENERATE_COMMAND = "python -m diffusion_core.metrics.train_classifier --data-root $STUDYCTL_DATA_ROOT --force"


class ClassifierWeightsError(RuntimeError):
    pass


# ------------------------------------------------------------------------ network
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


def _as_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1]; float input is taken to be in [-1,1] already."""
    if x.dtype == torch.uint8:
        return to_unit_range(x)
    return x.float()


class MnistResNet(nn.Module):
    """Reduced ResNet-18 for 1x28x28 inputs in [-1, 1].

    forward(x) -> logits for one batch. `features(x)`, `probs(x)` and
    `features_and_probs(x)` take any number of images (uint8 or [-1,1] floats, on any
    device), run them in batches of `batch_size` on the model's device under no_grad
    in eval mode, and return float32 tensors on the input's device.
    """

    def __init__(self, widths: Iterable[int] = DEFAULT_WIDTHS, num_classes: int = 10, in_channels: int = 1,
                 blocks: Iterable[int] = (2, 2, 2, 2)):
        super().__init__()
        widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        self.widths = widths
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        self.feature_dim = c

    # one batch, autograd allowed
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))

    # batched inference
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def features_and_probs(self, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.training
        self.eval()
        feats, probs = [], []
        try:
            for i in range(0, x.shape[0], batch_size):
                xb = _as_unit(x[i:i + batch_size].to(self.device, non_blocking=True))
                xb = xb.contiguous(memory_format=torch.channels_last)
                f = self.embed(xb)
                feats.append(f.float().to(x.device))
                probs.append(torch.softmax(self.fc(f).float(), dim=1).to(x.device))
        finally:
            self.train(was_training)
        if not feats:
            return (torch.empty(0, self.feature_dim, device=x.device),
                    torch.empty(0, self.fc.out_features, device=x.device))
        return torch.cat(feats), torch.cat(probs)

    def features(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Penultimate global-average-pooled features (N, 128)."""
        return self.features_and_probs(x, batch_size)[0]

    def probs(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """p(y|x), (N, 10)."""
        return self.features_and_probs(x, batch_size)[1]


# ------------------------------------------------------------------------ weights I/O
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_classifier(device: torch.device | str | None = None, *, weights: str | os.PathLike | None = None,
                    provenance: str | os.PathLike | None = None, verify: bool = True) -> MnistResNet:
    """The shipped (or given) classifier, sha256-checked against its provenance json, in eval mode."""
    wpath = Path(weights) if weights is not None else WEIGHTS_PATH
    ppath = Path(provenance) if provenance is not None else wpath.with_suffix(".json")
    if not wpath.exists():
        raise ClassifierWeightsError(
            f"classifier weights not found at {wpath}. Fix: regenerate them with `{REGENERATE_COMMAND}` "
            f"(or `studyctl classifier train`).")
    if not ppath.exists():
        raise ClassifierWeightsError(f"classifier provenance {ppath} missing (needed for the sha256 check)")
    meta = json.loads(ppath.read_text())
    digest = sha256_file(wpath)
    if verify and digest != meta.get("sha256"):
        raise ClassifierWeightsError(
            f"sha256 of {wpath} is {digest}, but {ppath.name} records {meta.get('sha256')}: the weights were "
            f"changed or corrupted. Fix: restore them from git or regenerate with `{REGENERATE_COMMAND}`.")
    model = MnistResNet(widths=meta.get("widths", DEFAULT_WIDTHS))
    state = torch.load(wpath, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.sha256 = digest  # type: ignore[attr-defined]  (keys reference-statistic caches)
    model = model.to(device if device is not None else "cpu").to(memory_format=torch.channels_last)
    return model.eval()


# ------------------------------------------------------------------------ training
def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer (dy, dx) in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    off = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
    rows = torch.arange(h)[None, :] + off[0][:, None]          # (B, H)
    cols = torch.arange(w)[None, :] + off[1][:, None]          # (B, W)
    bi = torch.arange(b)[:, None, None]
    return padded[bi, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(model: MnistResNet, images: ImageSet | torch.Tensor, labels: torch.Tensor | None = None,
             batch_size: int = 500) -> float:
    if isinstance(images, ImageSet):
        images, labels = images.images, images.labels
    p = model.probs(images, batch_size=batch_size)
    return int((p.argmax(1).cpu() == labels.cpu()).sum()) / len(labels)


def train_classifier(*, data_root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                     force: bool = False, seed: int = 0, epochs: int = 6, batch_size: int = 128,
                     lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, max_shift: int = 2,
                     widths: Iterable[int] = DEFAULT_WIDTHS, split_seed: int = 0, num_threads: int | None = 1,
                     device: str | torch.device = "cpu", progress: bool = True,
                     command: str | None = None, train_subset: int | None = None, evaluate_test: bool = True) -> dict:
    """Train the reduced ResNet-18 on the MNIST training split (48,000 images of split_seed);
    write the weights to `out` (default: the shipped WEIGHTS_PATH) and their provenance (sha256,
    hyperparameters, history, test accuracy) beside it as .json, each atomically.

    Deterministic for a given seed, torch version, device and num_threads (SGD + Nesterov,
    one-cycle LR, random +-`max_shift` px shifts from a seeded generator). Refuses to overwrite
    an existing weights file unless `force`. Returns the provenance dict that is written.
    train_subset (the first N images of the training split) and evaluate_test=False are for
    quick checks only; the shipped weights use the full split and report test accuracy.
    """
    from tqdm.auto import tqdm

    wpath = Path(out) if out is not None else WEIGHTS_PATH
    ppath = wpath.with_suffix(".json")
    if wpath.exists() and not force:
        raise FileExistsError(f"{wpath} exists; pass force=True (--force) to overwrite the shipped classifier")
    if num_threads:
        torch.set_num_threads(int(num_threads))
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    splits = mnist_splits(data_root, split_seed=split_seed, with_test=True)
    train_set, test_set = splits.train, splits.test
    if train_subset is not None:
        train_set = train_set.subset(torch.arange(min(int(train_subset), len(train_set))))
    x_train = to_unit_range(train_set.images)                 # (48000,1,28,28) in [-1,1], CPU
    y_train = train_set.labels.long()

    model = MnistResNet(widths=widths).to(device).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum, nesterov=True)
    n = len(train_set)
    steps_per_epoch = n // batch_size                          # drop the ragged last batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2, anneal_strategy="cos")
    t0 = time.perf_counter()
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="mnist classifier", disable=not progress, unit="step")
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb = random_shift(x_train[idx], max_shift, gen).to(device).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
            tot_correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.4f}")
        history.append({"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": tot_correct / seen})
    bar.close()
    train_seconds = time.perf_counter() - t0

    model.eval().cpu()
    test_acc = accuracy(model, test_set) if evaluate_test else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(wpath, buf.getvalue())
    meta = {
        "sha256": sha256_file(wpath),
        "file": wpath.name,
        "bytes": wpath.stat().st_size,
        "architecture": "reduced ResNet-18: BasicBlocks 2-2-2-2, 3x3 stride-1 stem, no max-pool, GAP, linear",
        "widths": list(model.widths),
        "parameters": count_parameters(model),
        "feature_dim": model.feature_dim,
        "input_range": "[-1, 1] (uint8 scaled as x/127.5 - 1)",
        "trained_on": f"MNIST training split, {n} images (split_seed={split_seed}); val and test never used in training",
        "seed": seed,
        "split_seed": split_seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": f"SGD nesterov momentum={momentum} wd={weight_decay} (no wd on BN/bias), "
                     f"OneCycle max_lr={lr} pct_start=0.2 cos",
        "augmentation": f"random integer shifts of +-{max_shift} px (background fill)",
        "memory_format": "channels_last",
        "history": history,
        "test_accuracy": test_acc,
        "test_set": "MNIST t10k, 10,000 images",
        "train_seconds": round(train_seconds, 1),
        "train_seconds_note": "wall clock of the training loop (data loading and test evaluation excluded)",
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "command": command or REGENERATE_COMMAND,
    }
    write_bytes(ppath, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _current_command() -> str:
    """This process's train_classifier command line, with --force (needed to regenerate the shipped file)."""
    args = [a for a in sys.argv[1:] if a != "--force"] + ["--force"]
    return "python -m diffusion_core.metrics.train_classifier " + " ".join(shlex.quote(a) for a in args)

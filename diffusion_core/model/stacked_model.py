"""K U-Nets of one architecture as one model: their parameters stacked, one vmapped forward.

The K parameter sets live in one flat (K, N) tensor — member k's parameters are the contiguous
row k, in `named_parameters()` order — and the per-parameter tensors the forward sees are views
of it, so Adam and EMA (stacked_optim.py) update all K members with a few whole-tensor ops, and
dropping a member is one row selection. Two forwards over the K parameter sets:
- grouped (default; stacked_grouped.py): the network written with grouped convolutions in one
  (B, K*C, H, W) layout, channels_last — nothing moves between ops;
- vmap: `torch.func.vmap` over `functional_call` of one template module (each convolution also
  becomes a grouped convolution, with the member dimension moved in and out around every op);
  the only path for configs with self-attention.

Dropout, member by member, bit-identical to `train()` on the CPU: in `train()` a model's dropout
masks come from the global CPU generator, which `build_model` seeded and the initialisation
advanced; each mask is `empty_like(h).bernoulli_(1 - p) / (1 - p)`, drawn in forward order. Here
every member keeps its own generator holding that state, and its masks are drawn the same way,
with the same shapes, in the same order (vmap itself cannot give each member its own
generator: for vmap they are drawn before the forward and fed to `FedDropout`, which replaces
the template's `nn.Dropout`; the grouped forward draws them in place). On a GPU, `train()`
draws masks with CUDA's fused dropout kernel (its own Philox stream), so there a member's
masks are statistically equivalent to a separate run's, not identical.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .stacked_grouped import GroupedForward
from .unet import UNet

BACKENDS = ("auto", "grouped", "vmap")  # auto: grouped unless the config has self-attention


class FedDropout(nn.Module):
    """Dropout whose masks are drawn outside the module and fed in, one per call, in forward order."""

    def __init__(self, p: float, feed: "_MaskFeed"):
        super().__init__()
        self.p, self.feed = p, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:  # as nn.Dropout: no draw at all
            return x
        if self.feed.shapes is not None:  # the shape probe
            self.feed.shapes.append(tuple(x.shape))
            return x
        return x * next(self.feed.masks)


class _MaskFeed:
    shapes: list | None = None
    masks = None


class StackedUNet:
    """K members with the same UNetConfig. `nets` give the initial weights (copied, not kept)."""

    def __init__(self, nets: list[UNet], dropout_generators: list[torch.Generator], backend: str = "auto",
                 channels_last: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"stacked backend={backend!r}; allowed: {', '.join(BACKENDS)}")
        if not nets:
            raise ValueError("a stacked group needs at least one member")
        self.config = nets[0].config
        self.feed = _MaskFeed()
        template = copy.deepcopy(nets[0])
        for name, module in list(template.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Dropout):
                    setattr(module, child_name, FedDropout(child.p, self.feed))
        self.template = template.to("meta")  # the parameters live in `flat`; only the code is used
        named = list(nets[0].named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        device = named[0][1].device
        self.flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for net in nets])
        self.flat = self.flat.to(device)
        self.generators = list(dropout_generators)
        self.dropout_p = next((m.p for m in template.modules() if isinstance(m, FedDropout)), 0.0)
        self._mask_shapes: dict[int, list[tuple]] = {}
        if backend == "auto":
            backend = "vmap" if nets[0].mid_attn is not None else "grouped"
        self.backend = backend
        self.grouped = GroupedForward(copy.deepcopy(nets[0]).to("meta"), channels_last) \
            if backend == "grouped" else None
        self._rebuild_views()

    # ------------------------------------------------------------------ layout
    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def _rebuild_views(self) -> None:
        """Per-parameter (K, *shape) leaves sharing `flat`'s storage (in-place updates of flat show)."""
        self.params, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes):
            self.params[name] = self.flat[:, off:off + n].view(self.k, *shape).detach().requires_grad_(True)
            off += n

    def param_list(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def flatten_grads(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(self.k, -1) for g in grads], dim=1)

    def keep(self, rows: list[int]) -> None:
        """Keep only these members (a finished or diverged member leaves the group)."""
        self.flat = self.flat[rows].contiguous()
        self.generators = [self.generators[r] for r in rows]
        self._rebuild_views()

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """One member's flat row as a state_dict (copies)."""
        out, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes):
            out[name] = row[off:off + n].view(shape).clone()
            off += n
        return out

    @staticmethod
    def flatten_state(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([state[n].reshape(-1) for n in names])

    # ----------------------------------------------------------------- forward
    def _probe_mask_shapes(self, x: torch.Tensor, t: torch.Tensor) -> list[tuple]:
        """Shapes of the dropout inputs of one member at this batch size (a shape-only pass)."""
        self.feed.shapes = []
        try:
            meta = {n: torch.empty(s, device="meta") for n, s in zip(self.names, self.shapes)}
            self.template.train()
            functional_call(self.template, meta, (x[0].to("meta"), t[0].to("meta")))
            return self.feed.shapes
        finally:
            self.feed.shapes = None

    def draw_masks(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Per dropout layer, a (K, *shape) mask; row k drawn from member k's generator."""
        if self.dropout_p == 0.0:
            return []
        b = x.shape[1]
        if b not in self._mask_shapes:
            self._mask_shapes[b] = self._probe_mask_shapes(x, t)
        keep_p = 1.0 - self.dropout_p
        masks = []
        for shape in self._mask_shapes[b]:
            m = torch.empty((self.k, *shape), device=x.device)
            for row, g in zip(m, self.generators):
                row.bernoulli_(keep_p, generator=g)
            masks.append(m.div_(keep_p))
        return masks

    def forward(self, x: torch.Tensor, t: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
                train: bool = True) -> torch.Tensor:
        """eps predictions (K, B, C, H, W) for inputs x (K, B, C, H, W) and timesteps t (K, B)."""
        params = self.params if params is None else params
        if self.grouped is not None:
            return self.grouped(params, x, t, self._grouped_dropout if train else None)
        self.template.train(train)
        masks = self.draw_masks(x, t) if train else []

        def one(p, xk, tk, mk):
            self.feed.masks = iter(mk)
            return functional_call(self.template, p, (xk, tk))

        return vmap(one, in_dims=(0, 0, 0, 0), randomness="error")(params, x, t, masks)

    def _grouped_dropout(self, h: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout in the grouped layout (B, K*C, H, W): member k's mask drawn as train() draws it
        (a contiguous (B, C, H, W) tensor from its generator), then put in place."""
        keep = 1.0 - p
        b, k = h.shape[0], len(self.generators)
        mask = torch.empty_like(h)
        blocks = mask.view(b, k, -1, *h.shape[2:])
        for j, g in enumerate(self.generators):
            blocks[:, j].copy_(torch.empty((b, *blocks.shape[2:]), device=h.device).bernoulli_(keep, generator=g))
        return h * mask.div_(keep)

    def views_of(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of another (K, N) tensor of this layout (the EMA weights)."""
        out, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[:, off:off + n].view(flat.shape[0], *shape)
            off += n
        return out

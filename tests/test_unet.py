"""The thesis's U-Net: shapes, exact parameter counts, and bad-configuration messages."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import UNet, UNetConfig, count_parameters


def expected_parameters(cfg: UNetConfig) -> int:
    """Parameter count from the thesis's U-Net (Table 1), layer by layer (independent of unet.py)."""
    conv = lambda i, o, k: i * o * k * k + o          # noqa: E731  conv / transposed conv with bias
    lin = lambda i, o: i * o + o                       # noqa: E731
    gn = lambda c: 2 * c                               # noqa: E731

    def res(i, o, temb):
        return gn(i) + conv(i, o, 3) + lin(temb, o) + gn(o) + conv(o, o, 3) + (0 if i == o else conv(i, o, 1))

    w = [cfg.base_width * m for m in cfg.channel_mult]
    temb = 4 * cfg.base_width
    total = lin(cfg.base_width, temb) + lin(temb, temb)           # sinusoidal -> MLP
    total += conv(cfg.in_channels, w[0], 3)                        # conv_in
    for lvl, width in enumerate(w):
        total += cfg.blocks_per_level * res(width, width, temb)
        if lvl < len(w) - 1:
            total += conv(width, w[lvl + 1], 3)                    # stride-2 down
    total += cfg.bottleneck_blocks * res(w[-1], w[-1], temb)
    if cfg.attention:
        total += gn(w[-1]) + conv(w[-1], 3 * w[-1], 1) + conv(w[-1], w[-1], 1)
    for lvl in reversed(range(len(w) - 1)):
        total += conv(w[lvl + 1], w[lvl], 4)                        # 4x4 stride-2 transposed conv
        total += res(2 * w[lvl], w[lvl], temb) + (cfg.blocks_per_level - 1) * res(w[lvl], w[lvl], temb)
    total += gn(w[0]) + conv(w[0], cfg.in_channels, 3)             # GN(4) -> Swish -> conv out
    return total


PINNED = [
    (dict(), 2_003_553),                                  # the thesis configuration
    (dict(base_width=8), 126_681),
    (dict(base_width=16), 502_833),
    (dict(base_width=64), 7_998_657),
    (dict(attention=True), 2_069_857),
    (dict(blocks_per_level=1), 1_481_121),
    (dict(channel_mult=(1, 2)), 504_545),
    (dict(base_width=8, channel_mult=(1, 2)), 32_249),
    (dict(in_channels=3, image_size=32), 2_004_707),
]


@pytest.mark.parametrize("kw, n", PINNED, ids=[str(k) or "thesis" for k, _ in PINNED])
def test_parameter_counts_pinned(kw, n):
    cfg = UNetConfig(**kw)
    model = UNet(cfg)
    assert count_parameters(model) == n
    assert expected_parameters(cfg) == n


def test_thesis_config_is_table1():
    cfg = UNetConfig()
    assert (cfg.in_channels, cfg.image_size, cfg.base_width, cfg.channel_mult, cfg.blocks_per_level,
            cfg.dropout, cfg.norm_groups, cfg.final_norm_groups, cfg.attention) == \
        (1, 28, 32, (1, 2, 4), 2, 0.1, 16, 4, False)
    assert cfg.widths == (32, 64, 128)
    m = UNet(cfg)
    assert m.conv_in.in_channels == 1 and m.conv_in.out_channels == 32
    assert [d.stride for d in m.downsamples] == [(2, 2), (2, 2)]
    assert [(u.kernel_size, u.stride) for u in m.upsamples] == [((4, 4), (2, 2))] * 2
    assert m.norm_out.num_groups == 4 and m.down_blocks[0][0].norm1.num_groups == 16
    assert m.down_blocks[0][0].dropout.p == 0.1


@pytest.mark.parametrize("in_ch, size, attention, mult", [
    (1, 28, False, (1, 2, 4)), (1, 28, True, (1, 2, 4)),
    (3, 32, False, (1, 2, 4)), (3, 32, True, (1, 2, 4)),
    (1, 28, True, (1, 2)), (3, 32, False, (1, 2, 2, 2)),
])
def test_output_shapes(in_ch, size, attention, mult):
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=in_ch, image_size=size, base_width=16, channel_mult=mult,
                            blocks_per_level=1, attention=attention)).eval()
    x = torch.randn(3, in_ch, size, size)
    out = model(x, torch.tensor([1, 500, 1000]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # a scalar t broadcasts over the batch and gives the same as a full vector
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.full((3,), 7)))
    # the timestep matters
    assert not torch.allclose(model(x, torch.full((3,), 1)), model(x, torch.full((3,), 900)))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=8, attention=True))
    model(torch.randn(2, 1, 28, 28), torch.tensor([3, 800])).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


# ------------------------------------------------------------------------- bad input
def test_image_size_that_cannot_be_halved():
    with pytest.raises(ValueError) as e:
        UNetConfig(image_size=30, channel_mult=(1, 2, 4))  # 30 -> 15 -> cannot halve
    msg = str(e.value)
    assert "image_size=30" in msg and "odd size 15" in msg and "2**2=4" in msg and "allowed" in msg
    UNetConfig(image_size=30, channel_mult=(1, 2))         # halved once: fine


@pytest.mark.parametrize("field, value, allowed", [
    ("base_width", -8, ">= 2"),
    ("base_width", 0, ">= 2"),
    ("base_width", 1, ">= 2"),   # one channel per GroupNorm group: blind to t
    ("blocks_per_level", 0, ">= 1"),
    ("dropout", 1.5, "[0, 1)"),
    ("channel_mult", (1, 0), ">= 1"),
    ("in_channels", 0, ">= 1"),
])
def test_bad_config_message_names_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as e:
        UNetConfig(**{field: value})
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and allowed in msg and "allowed" in msg


@pytest.mark.parametrize("width,mult", [(2, (1, 2, 4)), (8, (1, 2)), (16, (1, 2)), (8, (1, 2, 4)), (16, (1, 2, 4)), (32, (1, 2, 4))])
def test_every_packaged_width_sees_the_timestep(width, mult):
    """The time embedding is added before a GroupNorm: with one channel per group GroupNorm would
    subtract it again and the network would ignore t (it did, for width 8 x (1, 2) under GN(16))."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_width=width, channel_mult=mult, blocks_per_level=1, bottleneck_blocks=1,
                          dropout=0.0)).eval()
    for block in net.modules():
        if isinstance(block, torch.nn.GroupNorm):
            assert block.num_channels // block.num_groups >= 2, block
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        change = (net(x, torch.full((2,), 10)) - net(x, torch.full((2,), 900))).abs().mean()
    assert change > 1e-2


def test_thesis_groupnorm_is_unchanged():
    net = UNet(UNetConfig())
    groups = sorted({(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)})
    assert groups == [(32, 4), (32, 16), (64, 16), (128, 16)]

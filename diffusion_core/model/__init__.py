"""The U-Net noise predictor, and K of them stacked into one model (grouped convolutions or vmap)."""

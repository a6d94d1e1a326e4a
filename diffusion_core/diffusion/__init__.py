"""The diffusion maths: noise schedules, losses, the learned reverse variance, guidance and the samplers."""

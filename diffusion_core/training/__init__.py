"""Training: the one loop (engine.py), a run alone (train.py) or K stacked (stacked.py), EMA, the CUDA-graph step."""

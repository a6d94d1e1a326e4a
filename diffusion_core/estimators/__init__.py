"""The estimators: the bias/variance decomposition and its intervals, memorization -> generalization, the Gaussian toy."""

"""Compute plane: the K2 model, INT4 expert kernels, engine and Ray worker groups."""

"""Latent preference optimisation: a step as a Gaussian transition (`step`), the K-candidate sampler (`sampler`),
the loss (`loss`), the trainer (`train`) and LRM-guided sampling (`sample`)."""

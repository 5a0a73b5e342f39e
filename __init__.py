"""lpo: curate preference pairs, train latent reward models and run step-level latent preference optimisation
for text-to-image diffusion models (LRM + LPO, arXiv 2502.01051).

The installed package is this folder: `lpo.curate` (Pick-a-Pic ingest, scorers, MPCF), `lpo.reward` (model
families, latent reward model, LPO, evaluation, reward service, toy world) and `lpo.cli` (the `lpo` command).
"""

__version__ = "0.1.0"

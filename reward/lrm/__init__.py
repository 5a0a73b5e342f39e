"""The latent reward model: the model (`model`), its VAE-latent cache (`latents`), its loss (`loss`), its trainer
(`train`) and its accuracy per noise level (`accuracy`)."""

"""Generative models of single cells: count VAE, latent DiT, set transformer, baselines."""

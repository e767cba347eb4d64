"""Training: data loading, models (VAE, CVAE, PPCA), the training loop, evaluation and plots."""

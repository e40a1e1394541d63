"""Neural networks, named after the original checkpoints (LDM for U-Net/VAE, HF for CLIP)."""

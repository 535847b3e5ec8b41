"""Model code: MoE families that read Hugging Face checkpoints, sharded for EP."""

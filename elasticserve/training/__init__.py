"""What makes a pack: calibration, shape-aware LoRA fine-tuning, evaluation, export."""

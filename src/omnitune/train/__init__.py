"""Training: the loss, the HF Trainer glue (atomic checkpoints, resume), and the run entry point."""

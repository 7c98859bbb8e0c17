"""The one training loop on Accelerate/DeepSpeed with MLflow tracking (see the *Trainer* issue)."""

"""The training loop and its objectives, and how a run stops."""

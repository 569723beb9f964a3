"""The run folder: checkpoints, resume, export to Hugging Face."""

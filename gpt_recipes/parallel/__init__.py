"""Process groups and collectives, sequence and tensor parallelism."""

"""The core room: configuration, logging and small shared types. Depends on nothing else."""

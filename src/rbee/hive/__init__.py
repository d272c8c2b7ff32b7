"""rbee-hive: one per machine. Spawns workers and forgets them, owns the model files, reports devices."""

"""Where a worker should start: placement over hive snapshots, and the on-demand spawner."""

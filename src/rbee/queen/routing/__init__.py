"""Which worker serves a request: pure policies over snapshots, plus the queen's own load count."""

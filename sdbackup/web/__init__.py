"""The manager's web dashboard: its resource tree, JSON, pictures and listen rules."""

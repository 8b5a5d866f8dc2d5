"""sloth_replay: the replay store (SQLite) and example selection/mixing for continual updates."""

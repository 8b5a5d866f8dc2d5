"""Data in and out: training datasets imported from the formats people have, and what the daemon learnt exported."""

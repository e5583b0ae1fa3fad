"""Running models here: timing, parity, accuracy, latency tables, and the collaborative runtime."""

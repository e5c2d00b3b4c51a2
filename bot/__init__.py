"""The daemon and its wiring: configuration, logging, the polling/download/scoring pipeline."""

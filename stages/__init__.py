"""Floor 2: the work (decode, backbone taps, extraction, training, evaluation)."""

"""tfds builders producing the preference schema (importing this registers them with tfds)."""

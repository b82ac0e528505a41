"""The HTTP command gateway."""

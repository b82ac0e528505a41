"""Trust: the tenant audit hash chain, signed checkpoints, verification, and erasable personal data."""

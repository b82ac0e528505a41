"""Effects: carrying decided events into the outside world exactly once (``keel effects run``)."""

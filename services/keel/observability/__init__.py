"""Operating Keel: Prometheus metrics (every ``keel_*`` series, bounded tenant labels, each service's
``/metrics`` server and where Prometheus finds it). See docs/operations.md."""

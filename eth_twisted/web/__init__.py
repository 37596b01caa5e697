"""The stats API, Prometheus metrics and the dashboard (twisted.web)."""

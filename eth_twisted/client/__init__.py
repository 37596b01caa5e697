"""eth-client: watch the chain head, keep every block until the server acknowledges it, deliver it."""

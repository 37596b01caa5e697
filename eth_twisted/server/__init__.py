"""eth-server: receive netstrings, batch them into the sinks, answer each after the commit."""

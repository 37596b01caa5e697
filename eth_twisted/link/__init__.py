"""What both ends of the client-server link agree on: netstrings, replies, payloads, TLS and the handshake."""

"""eth-twisted: an Ethereum chain-head relay built on Twisted.

The client watches a JSON-RPC node and ships every new block, framed as
netstrings and kept in a durable outbox until acknowledged, to the server,
which records each message in SQL (MySQL/MariaDB or embedded SQLite) and
Redis before it answers.
"""

__version__ = "0.1.0"

"""Tests of eth_twisted.server."""

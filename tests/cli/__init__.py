"""Tests of eth_twisted.cli."""

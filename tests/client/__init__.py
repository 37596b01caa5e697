"""Tests of eth_twisted.client."""

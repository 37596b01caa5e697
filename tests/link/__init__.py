"""Tests of eth_twisted.link."""

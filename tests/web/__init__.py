"""Tests of eth_twisted.web."""

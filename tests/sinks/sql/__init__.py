"""Tests of eth_twisted.sinks.sql."""

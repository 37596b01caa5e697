"""Fault-injection toolkit and scenarios: a Twisted fault proxy, private services, an oracle.

The scenarios run the real ``eth server`` and ``eth client`` as subprocesses,
break what lies between them (the network, MariaDB, Redis, the Ethereum node),
and let :mod:`tests.faults.oracle` check afterwards that every block the node
produced is in SQL exactly once and that Redis agrees.
"""

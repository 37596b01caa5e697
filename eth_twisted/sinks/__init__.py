"""Storage back ends behind one batch-first interface (:class:`~eth_twisted.model.ISink`)."""

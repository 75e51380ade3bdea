"""Transports: the contract (``_base``), the native pamqp-over-anyio one, and more."""

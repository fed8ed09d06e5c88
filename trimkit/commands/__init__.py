"""Subcommands of the ``trimkit`` CLI (one module each, with ``register(subparsers)``)."""

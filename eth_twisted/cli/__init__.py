"""The ``eth`` console script and its subcommands."""

"""A module that fails while it is imported."""

raise RuntimeError("cli_broken refuses to import")

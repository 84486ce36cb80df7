"""The `dmtjepa` command line."""

"""The dissector service."""

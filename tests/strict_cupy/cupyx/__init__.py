"""The strict stand-in's ``cupyx`` (see ../README.md)."""

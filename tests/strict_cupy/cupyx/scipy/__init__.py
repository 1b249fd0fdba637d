"""The strict stand-in's ``cupyx.scipy`` (see ../../README.md)."""

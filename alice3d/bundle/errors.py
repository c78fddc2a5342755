"""The one error type of the bundle exporter: the message names the file/flag and what was expected."""

from alice3d.errors import Alice3DError


class ExportError(Alice3DError, ValueError):
    """A run, network, metadata or output directory the exporter cannot use."""

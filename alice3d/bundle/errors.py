"""The one error type of the bundle exporter: the message names the file/flag and what was expected."""


class ExportError(ValueError):
    """A run, network, metadata or output directory the exporter cannot use."""

"""mstm: Mirror, Stage and Move."""

__version__ = "0.1.0"

"""ImageShare node: consented, ledgered exchange of radiology images between hospitals."""

__version__ = "0.1.0"

"""Pure core: formats and rules. No I/O, no clock reads."""

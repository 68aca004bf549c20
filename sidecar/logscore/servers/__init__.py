"""Protocol surfaces: each decodes, calls the one scoring core, encodes."""

"""Loading a guest image: ELF parsing and the PVH boot protocol."""

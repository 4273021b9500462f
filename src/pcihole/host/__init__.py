"""Host-side primitives below every other layer: mappings, memfds and their seals, the cache directory."""

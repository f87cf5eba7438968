"""The mesh: nodes linked over mutual TLS, carrying FlatBuffers frames (docs/mesh.md)."""

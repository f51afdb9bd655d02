"""Pieces shared by the scan families: chunk layout of (packed) sequences, the chunk-state scan,
input checks."""

"""Pure dict -> dict renames between checkpoint layouts and our canonical names."""

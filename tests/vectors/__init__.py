"""Known-answer vectors and their generators (independent re-implementations of docs/format.md)."""

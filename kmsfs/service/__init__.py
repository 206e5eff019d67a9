"""Service functions: one per operator action. The CLIs parse, call one of these, and render."""

"""Real local servers that stand in for upstream APIs in tests."""

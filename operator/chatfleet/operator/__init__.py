"""chatfleet operator."""

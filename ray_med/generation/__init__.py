"""Text generation at load: many requests decoded together, one token per step (no Ray)."""

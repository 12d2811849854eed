"""Small shared utilities: seeding, atomic file writes."""

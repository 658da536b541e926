"""State behind one interface: `memory` (one process, snapshot file) and `redis` (shared)."""

"""Fixtures for simulated boards (see flasher.sim.board)."""

"""The rollout service: CLI today; Ray workers, pool, ZeroMQ front end and trajectories to come."""

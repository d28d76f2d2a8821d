"""Results of a search: typed Parquet export and the leaderboard."""

from results.export import EPOCH_SCHEMA, TRIAL_SCHEMA, export_run, leaderboard, load_run_config

__all__ = ["EPOCH_SCHEMA", "TRIAL_SCHEMA", "export_run", "leaderboard", "load_run_config"]

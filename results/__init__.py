"""Results of a search: typed Parquet export, analysis, the HTML report, test evaluation, export and predict.

Modules: ``export`` (trials and epochs tables), ``analysis`` (leaderboard, effects, importance, compare),
``report`` (self-contained HTML), ``evaluate`` (the held-out test split, once), ``model_export`` and ``predict``.
Only ``export`` is imported here, because the others load TensorFlow or matplotlib.
"""

from results.export import EPOCH_SCHEMA, TRIAL_SCHEMA, export_run, leaderboard, load_run_config

__all__ = ["EPOCH_SCHEMA", "TRIAL_SCHEMA", "export_run", "leaderboard", "load_run_config"]

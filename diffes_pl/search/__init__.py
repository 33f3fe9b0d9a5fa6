"""The evolutionary search: population operators, rollouts with reuse, the search object
(evolution.py), the DiffES LightningModule that drives it (module.py), resuming, baselines and
hold-out scoring of schedules."""

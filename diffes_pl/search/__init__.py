"""The evolutionary search: what it searches over (space.py: the SearchSpace protocol; level_space.py,
joint_space.py), rollouts with prefix reuse (rollouts.py), the search object (evolution.py) with racing
(racing.py), its settings and assembly (settings.py, builder.py), the DiffES LightningModule that
drives it (lightning_module.py), resuming (resume.py), baselines and hold-out scoring of schedules."""

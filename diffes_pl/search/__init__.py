"""The evolutionary search: population operators, rollouts with reuse, the DiffES LightningModule."""

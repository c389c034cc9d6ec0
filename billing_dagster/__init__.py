"""billing-dagster: Kafka billing events to exact money figures, in Dagster micro-batches."""

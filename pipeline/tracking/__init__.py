"""MLflow for the train and report stages: the store (store), a run's tags (tags), recording a run (record)."""

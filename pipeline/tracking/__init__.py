"""MLflow for the train and report stages, in three parts: where the store is and how it is opened
(:mod:`~pipeline.tracking.store`), what a run is tagged with (:mod:`~pipeline.tracking.tags`), and
how a run is recorded and found again (:mod:`~pipeline.tracking.record`).
"""

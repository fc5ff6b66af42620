"""Data: the FeatureStore format, data sources, task pools and samplers."""

from spider_jax.data.store import (FeatureStore, GroundTruth, PTMInfo,
                                   StoreError, StoreWriter, TaskData,
                                   read_ground_truth, validate_features,
                                   validate_labels)

__all__ = ["FeatureStore", "GroundTruth", "PTMInfo", "StoreError",
           "StoreWriter", "TaskData", "read_ground_truth", "validate_features",
           "validate_labels"]

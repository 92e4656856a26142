"""MetaLSTM's system around the core: task stores, Ray training, MLflow tracking and Ray Serve."""

"""``metalstm train``: distributed meta-training on Ray Train.

``command`` (the CLI) calls ``train`` (the driver: task store, MLflow run, ``TorchTrainer``), which runs
``worker.train_func`` on every worker: ``pretrain`` (the optional first stage), ``state`` (the checkpoint and the
resume from it), ``reporting`` (job log, ``ray.train.report``, MLflow), ``shards`` (the worker's tasks) and
``collective`` (the batch split and the all-reduce) and ``divergence`` (what a non-finite step does). The steps
themselves are in ``metalstm.training``.
"""

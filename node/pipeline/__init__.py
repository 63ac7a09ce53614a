"""The pipeline: Celery app and queues, dispatch from the ledger, tasks, embedded workers.

``node.pipeline.app`` and ``node.pipeline.dispatch`` are what the listener process uses;
they enqueue tasks *by name* and never import torch. ``node.pipeline.tasks`` runs in
worker processes only.
"""

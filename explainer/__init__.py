"""The asynchronous explainer: workers that say what each latent means, and how sure they are."""

from explainer.worker import BACKENDS, Worker
from monitor.store.jobs import explanations, file_job

__all__ = ["BACKENDS", "Worker", "explanations", "file_job"]

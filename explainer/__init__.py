"""The asynchronous explainer: workers that say what each latent means, and how sure they are."""

from explainer.jobs import explanations, file_job
from explainer.worker import BACKENDS, Worker

__all__ = ["BACKENDS", "Worker", "explanations", "file_job"]

"""The asynchronous explainer: workers that say what each latent means, and how sure they are."""

from explainer.worker import BACKENDS, Worker, WorkerSettings
from monitor.store.jobs import best_explanation, explanation_history, explanations, file_job

__all__ = ["BACKENDS", "Worker", "WorkerSettings", "best_explanation", "explanation_history", "explanations", "file_job"]

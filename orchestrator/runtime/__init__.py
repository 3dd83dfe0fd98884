"""Where tasks and monitors run: local processes, or Kubernetes Jobs (``RUNTIME``)."""

from orchestrator.runtime.base import Handle, Runtime, TaskLaunch

__all__ = ["Handle", "Runtime", "TaskLaunch", "make_runtime"]


def make_runtime(settings, log_dir) -> Runtime:
    """The runtime ``settings.runtime`` names."""
    from pipeline.settings import Runtime as RuntimeName

    if settings.runtime is RuntimeName.LOCAL:
        from orchestrator.runtime.local import LocalRuntime

        return LocalRuntime(settings, log_dir)
    from orchestrator.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime(settings)

"""The pipeline's roles in a cluster, and the one place that says which Secrets each one gets.

Every credential goes only where it is used (docs/kubernetes.md, "Roles and credentials"):

- the database's (``DATABASE_URL``) to the orchestrator and the monitor-consumer;
- a Kafka user per role (SCRAM-SHA-512, ``KAFKA_SASL_USERNAME``/``KAFKA_SASL_PASSWORD``), whose
  ACLs (``k8s/kafka.yaml``, acls.txt) allow exactly what that role does;
- MLflow's to the monitor-consumer (``scorer``: reads the registry) and to training
  (``training``: registers ``expected-usage`` and moves its alias), ``MLFLOW_TRACKING_USERNAME``/
  ``MLFLOW_TRACKING_PASSWORD`` as MLflow's clients read them.

``python -m pipeline deploy`` creates the Secrets (:mod:`ops.deploy`); the Job templates
(:mod:`orchestrator.runtime.job_specs`) and ``k8s/monitor-consumer.yaml`` hand each container
its role's Secrets and no other.
"""

from __future__ import annotations

# POSTGRES_PASSWORD and DATABASE_URL. The name is the one the single Secret of earlier
# releases had: an existing database keeps its password (PostgreSQL set it on its first start).
DATABASE_SECRET = "pipeline-credentials"

# Kafka's users: the super user and one per role. acls.txt in k8s/kafka.yaml names them.
KAFKA_ADMIN = "admin"
KAFKA_USERS = (KAFKA_ADMIN, "orchestrator", "task", "sampler", "consumer")
KAFKA_USERNAME_KEY = "KAFKA_SASL_USERNAME"
KAFKA_PASSWORD_KEY = "KAFKA_SASL_PASSWORD"

# MLflow's users (its basic-auth app): the admin, training (edits the registered model) and
# the scorer (reads it).
MLFLOW_ADMIN = "admin"
MLFLOW_USERS = (MLFLOW_ADMIN, "training", "scorer")
MLFLOW_USERNAME_KEY = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_KEY = "MLFLOW_TRACKING_PASSWORD"
# Only in the admin's Secret: the MLflow server's key for signing its sessions (CSRF).
MLFLOW_SERVER_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"


def kafka_secret(user: str) -> str:
    """The Secret of one Kafka user: ``kafka-<user>``."""
    return f"kafka-{user}"


def mlflow_secret(user: str) -> str:
    """The Secret of one MLflow user: ``mlflow-<user>``."""
    return f"mlflow-{user}"


# The Secrets every kind of pipeline container gets through envFrom, and only those (the
# ConfigMap pipeline-settings goes to all of them). A key is a pod's app.kubernetes.io/component,
# or "sampler" for the task pod's sidecar.
CONTAINER_SECRETS: dict[str, tuple[str, ...]] = {
    "orchestrator": (DATABASE_SECRET, kafka_secret("orchestrator")),
    "task": (kafka_secret("task"),),
    "sampler": (kafka_secret("sampler"),),
    "monitor-consumer": (DATABASE_SECRET, kafka_secret("consumer"), mlflow_secret("scorer")),
    # The stop-only relay of a failed order: a sampler without a task.
    "monitor-producer": (kafka_secret("sampler"),),
}

# Every Secret of the pipeline, in the order `deploy` creates them.
ALL_SECRETS: tuple[str, ...] = (DATABASE_SECRET, *(kafka_secret(u) for u in KAFKA_USERS),
                                *(mlflow_secret(u) for u in MLFLOW_USERS))

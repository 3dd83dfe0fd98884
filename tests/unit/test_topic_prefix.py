"""TOPIC_PREFIX: checked like every setting, handed to children and Jobs, and applied by the
Kafka wrappers' one mapping between logical and physical topic names."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from orchestrator.runtime.job_specs import JobTemplates
from ops import deploy
from pipeline.errors import SettingsError
from pipeline.invocation import TaskInvocation
from pipeline.kafka.topics import TopicNames
from pipeline.protocol import ORCHESTRATOR_TOPIC, RESOURCE_TOPIC_PATTERN, TASK_TOPIC_PATTERN
from pipeline.settings import Settings


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    return {"PIPELINE_STATE_DIR": str(tmp_path), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}


def test_no_prefix_by_default_keeps_the_plain_names(base) -> None:
    settings = Settings.from_env(base)
    names = TopicNames.of(settings)

    assert settings.topic_prefix == ""
    assert names.physical("task7") == "task7"
    assert names.pattern(TASK_TOPIC_PATTERN) == TASK_TOPIC_PATTERN
    assert names.logical_all({"task7", "__consumer_offsets"}) == {"task7", "__consumer_offsets"}
    assert "(none" in settings.describe()["TOPIC_PREFIX"]


@pytest.mark.parametrize("prefix", ["team-a.", "ci_42-", "x", "A.b_C-9", "p" * 200])
def test_a_legal_prefix_is_kept_and_reaches_a_child(base, prefix: str) -> None:
    settings = Settings.from_env({**base, "TOPIC_PREFIX": prefix})

    assert settings.topic_prefix == prefix
    assert settings.to_env()["TOPIC_PREFIX"] == prefix
    assert Settings.from_env(settings.to_env()) == settings
    assert settings.describe()["TOPIC_PREFIX"] == prefix


@pytest.mark.parametrize("prefix", ["team a.", "team/a", "tëam.", "a:b", "a*", "p" * 201])
def test_a_bad_prefix_is_one_clear_error_line(base, prefix: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**base, "TOPIC_PREFIX": prefix})

    message = str(caught.value)
    assert message.startswith("TOPIC_PREFIX=") and "\n" not in message
    assert "A-Z a-z 0-9 . _ -" in message


def test_another_prefix_is_another_deployment(base) -> None:
    """The shared monitors' groups carry the deployment id: two prefixes never share them,
    and no prefix keeps the id it always had."""
    plain = Settings.from_env(base)
    team_a = Settings.from_env({**base, "TOPIC_PREFIX": "team-a."})
    team_b = Settings.from_env({**base, "TOPIC_PREFIX": "team-b."})

    assert len({plain.deployment_id(), team_a.deployment_id(), team_b.deployment_id()}) == 3
    assert Settings.from_env({**base, "TOPIC_PREFIX": ""}).deployment_id() == plain.deployment_id()


def test_names_map_both_ways_under_a_prefix() -> None:
    names = TopicNames("team-a.")

    assert names.physical(ORCHESTRATOR_TOPIC) == "team-a.orchestrator"
    assert names.physical_all(["task3", "resource3"]) == ["team-a.task3", "team-a.resource3"]
    assert names.logical("team-a.task3") == "task3"
    assert names.owns("team-a.anomalies") and not names.owns("anomalies")
    # Listing: only this prefix's topics, without it.
    listed = {"task3", "team-a.task3", "team-b.task3", "team-a.orchestrator", "__consumer_offsets"}
    assert names.logical_all(listed) == {"task3", "orchestrator"}
    with pytest.raises(ValueError, match="not under TOPIC_PREFIX"):
        names.logical("team-b.task3")


def test_subscription_patterns_match_only_this_prefix_and_its_order_topics() -> None:
    names = TopicNames("team.a-")  # '.' must be taken literally, not as any character
    task = re.compile(names.pattern(TASK_TOPIC_PATTERN))
    resource = re.compile(names.pattern(RESOURCE_TOPIC_PATTERN))

    assert names.pattern(TASK_TOPIC_PATTERN) == r"^team\.a-task[1-9][0-9]*$"
    assert task.match("team.a-task12") and resource.match("team.a-resource3")
    for other in ("task12", "teamXa-task12", "x.team.a-task12", "team.a-task0", "team.a-resource3",
                  "team.a-task12-old"):
        assert not task.match(other), other
    assert names.pattern(ORCHESTRATOR_TOPIC) == "team.a-orchestrator"  # a plain name stays plain


def test_jobs_carry_the_orchestrators_prefix(tmp_path) -> None:
    """An order's pods talk on the topics their orchestrator created, whatever the ConfigMap
    says (an orchestrator outside the cluster may have its own)."""
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "TOPIC_PREFIX": "team-a."})
    templates = JobTemplates(settings, run_id="abc123")
    launch = TaskInvocation(order_id=42, required_tasks=("median",), task_name="median", progress=(),
                            image=Path("/artifacts/inputs/x.jpg"), params={}, attempt=1)
    task_pod = templates.task_job(launch, 60)["spec"]["template"]["spec"]
    monitor_pod = templates.monitor_job("consumer", 42)["spec"]["template"]["spec"]

    containers = [*task_pod["containers"], *task_pod["initContainers"], *monitor_pod["containers"]]
    assert len(containers) == 3
    for container in containers:
        assert {"name": "TOPIC_PREFIX", "value": "team-a."} in container["env"], container["name"]


def test_deploy_puts_the_prefix_in_the_configmap(tmp_path) -> None:
    settings = Settings.from_env({"PIPELINE_STATE_DIR": str(tmp_path), "TOPIC_PREFIX": "team-a."})
    args = types.SimpleNamespace(namespace=None, image_tag=None, image_registry=None, kubeconfig=None,
                                 dry_run=True, create_namespace=False)
    options = deploy.DeployOptions.from_args(args, settings)

    config_map = next(o for o in deploy.render(settings_values=options.settings_values)
                      if o["kind"] == "ConfigMap" and o["metadata"]["name"] == deploy.SETTINGS_CONFIGMAP)
    assert config_map["data"]["TOPIC_PREFIX"] == "team-a."
    plain = next(o for o in deploy.render() if o["metadata"]["name"] == deploy.SETTINGS_CONFIGMAP)
    assert plain["data"]["TOPIC_PREFIX"] == ""

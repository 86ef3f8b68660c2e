"""deployments/prefect.yaml: every entrypoint loads as a flow from the installed package
(no checkout, no pull step, no undocumented variable) and every deployment's parameters
validate against its flow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_no_pull_step_and_no_template_resolved_at_deploy_time():
    config = yaml.safe_load(PREFECT_YAML.read_text())
    assert not config.get("pull"), "a worker needs only the installed package"
    # `{{ $VAR }}` would be resolved on the deploying machine, not on the worker.
    assert not re.search(r"\{\{\s*\$", PREFECT_YAML.read_text())


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_entrypoint_loads_and_parameters_validate(deployment):
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = deployment["entrypoint"]
    assert ":" not in entrypoint and not entrypoint.endswith(".py"), "a module path"
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    parameters = deployment.get("parameters") or {}
    validated = flow.validate_parameters(parameters)
    assert set(parameters) <= set(validated)
    assert deployment["work_pool"]["name"] == "tvsplit"


def test_documented_environment_variables_exist_in_the_settings():
    """Every TVSPLIT_* variable the header names is a field of the settings (or the storage
    options variable); nothing else is needed."""
    from tvsplit.flows.settings import Settings
    from tvsplit.storage.object_store import ENV

    named = set(re.findall(r"\bTVSPLIT_[A-Z_]+", PREFECT_YAML.read_text()))
    known = {f"TVSPLIT_{name.upper()}" for name in Settings.model_fields} | {ENV}
    assert named and named <= known, named - known

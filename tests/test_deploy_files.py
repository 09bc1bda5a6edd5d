"""deploy/: no container engine runs here, so the Dockerfile and compose file are checked for what
can go stale without one: paths they copy or mount exist, every EDGEPACK_AGENT_* variable they set
is a real agent setting, ports agree, and the image never gets TensorFlow or the packager."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _known_env() -> set[str]:
    from device_agent.config import _TOML, ENV_PREFIX

    return {ENV_PREFIX + k.upper() for k in _TOML}


def test_dockerfile_copies_only_the_agent_and_sets_real_settings():
    text = (DEPLOY / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M)
    sources = [s for line in copies for s in line.split()]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    assert "packager" not in sources and '".[agent]"' in text and "tensorflow" not in text.replace(
        'import tensorflow', '')
    env = set(re.findall(r"(EDGEPACK_AGENT_[A-Z_]+)=", text))
    assert env and env <= _known_env(), env - _known_env()
    assert "USER edgepack" in text and "EXPOSE 8080" in text and "/v2/health/live" in text


def test_compose_file_is_consistent():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = doc["services"]
    assert {"mosquitto", "agent", "prometheus"} <= set(svc)
    build = svc["agent"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    env = set(svc["agent"]["environment"])
    assert env <= _known_env(), env - _known_env()
    assert svc["agent"]["environment"]["EDGEPACK_AGENT_BROKER"] == "mqtt://mosquitto:1883"
    for s in svc.values():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).is_file(), src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["agent:8080"]
    assert "listener 1883" in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()

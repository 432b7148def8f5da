"""The deployment files parse, and they use the settings, metrics and endpoints the server has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from stream_server.metrics import Metrics
from stream_server.settings import Settings
from tests.server_harness import ROOT

DEPLOY = ROOT / "deploy"


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def test_every_kubernetes_manifest_parses_and_the_kustomization_names_them_all() -> None:
    docs = manifests()
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "Ingress", "Deployment", "ScaledObject", "ConfigMap", "Secret"} <= kinds
    listed = set(yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_each_pool_has_nodes_probes_drain_and_a_scaler_on_the_exported_metrics() -> None:
    docs = manifests()
    exported = {m.name for m in Metrics().registry.collect()}
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    scalers = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert set(sets) == set(scalers) == {"musetalk-local", "musetalk-cloud"}
    for name, node in sets.items():
        pod = node["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MTS_CLUSTER__POOL"] == name.removeprefix("musetalk-")
        assert pod["terminationGracePeriodSeconds"] > Settings().cluster.drain_timeout_s
        for trigger in scalers[name]["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            for metric in re.findall(r"(mts_\w+)\{", trigger["metadata"]["query"]):
                assert metric in exported, metric


def test_the_shipped_config_is_valid_settings(tmp_path: Path, monkeypatch) -> None:
    config = next(d for d in manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "musetalk-config")
    toml = tmp_path / "musetalk.toml"
    toml.write_text(config["data"]["musetalk.toml"])
    monkeypatch.setenv("MTS_CONFIG", str(toml))
    monkeypatch.setenv("MTS_SERVER__PUBLIC_URL", "https://stream.example.com/node/musetalk-local-0")
    settings = Settings()
    settings.check()
    assert settings.queue.store == "redis" and settings.pools.tiers["vip"] == ["local"]


def test_the_grafana_dashboard_parses_and_charts_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "musetalk-stream.json").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"(mts_\w+)", t["expr"])}
    assert used, "no panel charts anything"
    for metric in used:
        base = re.sub(r"_(bucket|total|count|sum)$", "", metric)
        assert metric in exported or base in exported, metric

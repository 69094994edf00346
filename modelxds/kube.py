"""The one way modelxds reaches the Kubernetes API (`serve --kubernetes`, `label`)."""

from __future__ import annotations

from kubernetes import client, config


class KubernetesConfigError(ValueError):
    """No way to reach the API server: the message names what was tried."""


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """A client from ``kubeconfig``; without one, the pod's service account (in a
    cluster), else the default kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration, persist_config=False)
    except (config.ConfigException, OSError, ValueError) as e:
        tried = kubeconfig or "in-cluster service account, then the default kubeconfig"
        raise KubernetesConfigError(f"cannot configure a Kubernetes client ({tried}): {e}") from e
    return client.ApiClient(configuration)

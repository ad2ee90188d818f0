"""How fast the Kubernetes source decodes pods, and how much memory its cache keeps per pod.

    python -m kube_network_policies.lab.bench_decode [--pods 10000] [--json]

Synthetic pods shaped like a real API server's (managedFields, status conditions, container
statuses, several containers with ports; ~4 KiB of JSON each), in deployments of 10 replicas
that share their labels, plus one in ten pods with labels of its own (StatefulSet-like). They
are served in pages of 500 through httpx's MockTransport to a real `Informer`, so the figures
cover the whole list path: HTTP response, msgspec decoding, model.Pod, diff, cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from typing import Any

import httpx

from kube_network_policies.sources.codecs import PodCodec
from kube_network_policies.sources.informer import Informer
from kube_network_policies.sources.kubeconfig import ApiConfig
from kube_network_policies.sources.resources import PODS


def synthetic_pod(i: int) -> dict[str, Any]:
    ns = f"team-{i % 50}"
    deploy = f"app-{i // 10}"
    labels = {"app": deploy, "pod-template-hash": f"{i // 10:08x}", "tier": ("web", "api", "db")[i % 3]}
    if i % 10 == 9:
        labels["statefulset.kubernetes.io/pod-name"] = f"{deploy}-{i}"
    name = f"{deploy}-{i:06d}-x7k2p"
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    ts = "2026-01-01T00:00:00Z"
    container = {
        "name": "main",
        "image": "registry.example.com/app:1.2.3",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
        "volumeMounts": [{"name": "kube-api-access", "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    sidecar = {
        "name": "proxy",
        "image": "registry.example.com/proxy:2.0",
        "ports": [{"name": "proxy", "containerPort": 15001}],
        "restartPolicy": "Always",
    }
    return {
        "metadata": {
            "name": name,
            "generateName": f"{deploy}-",
            "namespace": ns,
            "uid": f"0000{i:08d}-1111-2222-3333-444455556666",
            "resourceVersion": str(1000 + i),
            "creationTimestamp": ts,
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": ts},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{deploy}-{i // 10:08x}",
                    "uid": "abcd",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": ts,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}}},
                        "f:spec": {"f:containers": {'k:{"name":"main"}': {".": {}, "f:image": {}, "f:ports": {}}}},
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": ts,
                    "fieldsType": "FieldsV1",
                    "subresource": "status",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {},
                            "f:containerStatuses": {},
                            "f:hostIP": {},
                            "f:phase": {},
                            "f:podIP": {},
                            "f:podIPs": {},
                            "f:startTime": {},
                        }
                    },
                },
            ],
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access",
                    "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420},
                }
            ],
            "initContainers": [sidecar],
            "containers": [container],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "nodeName": f"node-{i % 100}",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
                for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": f"192.168.0.{i % 100}",
            "hostIPs": [{"ip": f"192.168.0.{i % 100}"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": ts,
            "containerStatuses": [
                {
                    "name": "main",
                    "state": {"running": {"startedAt": ts}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": "registry.example.com/app:1.2.3",
                    "imageID": "registry.example.com/app@sha256:" + "0" * 64,
                    "containerID": "containerd://" + "1" * 64,
                    "started": True,
                }
            ],
            "qosClass": "Burstable",
        },
    }


def make_pages(pods: int, page_size: int = 500) -> list[bytes]:
    pages = []
    for start in range(0, pods, page_size):
        end = min(pods, start + page_size)
        meta: dict[str, Any] = {"resourceVersion": "99999"}
        if end < pods:
            meta["continue"] = f"page-{end}"
            meta["remainingItemCount"] = pods - end
        pages.append(
            json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": [synthetic_pod(i) for i in range(start, end)]}).encode()
        )
    return pages


def _informer(pages: list[bytes], page_size: int) -> Informer:
    by_token = {"": pages[0], **{f"page-{(k + 1) * page_size}": p for k, p in enumerate(pages[1:])}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=by_token[request.url.params.get("continue", "")], headers={"Content-Type": "application/json"})

    config = ApiConfig("http://bench.invalid")
    informer = Informer(config, PODS, lambda r, c, rv: None, page_size=page_size, transport=httpx.MockTransport(handler))
    informer._client = config.client(httpx.MockTransport(handler))
    return informer


def run(pods: int = 10_000, page_size: int = 500, rounds: int = 3) -> dict[str, float]:
    pages = make_pages(pods, page_size)
    size = sum(len(p) for p in pages)
    codec = PodCodec()
    decode_s = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        n = 0
        for page in pages:
            _, _, items = codec.page(page)
            n += sum(1 for _ in items)
        decode_s.append(time.perf_counter() - t0)
    list_s = []
    for _ in range(rounds):
        informer = _informer(pages, page_size)
        gc.collect()
        t0 = time.perf_counter()
        informer._list()
        list_s.append(time.perf_counter() - t0)
        assert len(informer.cache) == pods
        del informer
    # Memory kept by the cache (model.Pod objects, their strings and tuples, the dict), measured
    # with tracemalloc around a list into a fresh informer; the JSON pages existed before.
    informer = _informer(pages, page_size)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    informer._list()
    gc.collect()
    cache_bytes = tracemalloc.get_traced_memory()[0] - before
    # Add what the control process also keeps: the agent's applied-objects dict and an engine.
    from kube_network_policies.engine import ClusterState

    before = tracemalloc.get_traced_memory()[0]
    objects = dict(informer.cache)
    state = ClusterState()
    for pod in objects.values():
        state.apply(pod)
    gc.collect()
    engine_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "pods": pods,
        "json_bytes_per_pod": size / pods,
        "decode_s": statistics.median(decode_s),
        "list_s": statistics.median(list_s),
        "cache_bytes_per_pod": cache_bytes / pods,
        "agent_and_engine_bytes_per_pod": engine_bytes / pods,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_network_policies.lab.bench_decode")
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = run(args.pods)
    print(f"{r['pods']} pods, {r['json_bytes_per_pod']:.0f} bytes of JSON each, pages of 500")
    print(f"decode (msgspec -> model.Pod):          {r['decode_s'] * 1000:.0f} ms")
    print(f"list through an Informer (HTTP mock):   {r['list_s'] * 1000:.0f} ms")
    print(f"informer cache:                         {r['cache_bytes_per_pod']:.0f} bytes/pod")
    print(f"+ agent objects dict + engine state:    {r['agent_and_engine_bytes_per_pod']:.0f} bytes/pod")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

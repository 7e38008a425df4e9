#!/bin/sh
# Drover autoscaler hook for agents in a Kubernetes Deployment (the `exec` hook).
#
#   hook:
#     exec: {command: ["deploy/hooks/k8s.sh"], timeout: 60s}
#
# The Deployment is DROVER_K8S_DEPLOYMENT, else the pool's name, in DROVER_K8S_NAMESPACE
# (default "default"). Agents should run with --instance-id set to their pod name (the
# default under Kubernetes: the host name is the pod's). Needs kubectl allowed to patch pods and
# scale deployments.
#   scale-out: scale the Deployment to DROVER_DESIRED replicas (idempotent);
#   scale-in:  mark exactly the drained pods in DROVER_REMOVE_INSTANCES with the lowest
#              pod-deletion-cost, so the ReplicaSet removes those pods and no busy one, then scale
#              to DROVER_DESIRED.
set -eu
deploy="${DROVER_K8S_DEPLOYMENT:-$DROVER_POOL}"
ns="${DROVER_K8S_NAMESPACE:-default}"
: "${DROVER_DESIRED:?}" "${DROVER_DECISION_ID:?}"
echo "drover decision $DROVER_DECISION_ID: $ns/$deploy -> $DROVER_DESIRED" >&2
for pod in ${DROVER_REMOVE_INSTANCES:-}; do
    if ! out=$(kubectl -n "$ns" annotate pod "$pod" --overwrite \
            controller.kubernetes.io/pod-deletion-cost=-1000 2>&1); then
        case "$out" in
            *NotFound*|*"not found"*) echo "pod $pod is already gone" >&2 ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
done
kubectl -n "$ns" scale "deployment/$deploy" --replicas="$DROVER_DESIRED"

#!/bin/sh
# Drover autoscaler hook for a GCP managed instance group (the `exec` hook).
#
#   hook:
#     exec: {command: ["deploy/hooks/gcp-mig.sh"], timeout: 120s}
#
# The group is DROVER_MIG_NAME, else the pool's name, in DROVER_GCP_ZONE (or DROVER_GCP_REGION
# for a regional group). Needs gcloud with compute.instanceGroupManagers.update.
#   scale-out: resize the group to DROVER_DESIRED (idempotent);
#   scale-in:  delete exactly the drained instances in DROVER_REMOVE_INSTANCES, which lowers the
#              group's target size with them (an instance already gone is not an error).
set -eu
group="${DROVER_MIG_NAME:-$DROVER_POOL}"
: "${DROVER_DESIRED:?}" "${DROVER_DECISION_ID:?}"
if [ -n "${DROVER_GCP_REGION:-}" ]; then
    where="--region=$DROVER_GCP_REGION"
else
    where="--zone=${DROVER_GCP_ZONE:?set DROVER_GCP_ZONE or DROVER_GCP_REGION}"
fi
echo "drover decision $DROVER_DECISION_ID: $group -> $DROVER_DESIRED" >&2
if [ -n "${DROVER_REMOVE_INSTANCES:-}" ]; then
    list=$(echo $DROVER_REMOVE_INSTANCES | tr ' ' ',')
    if ! out=$(gcloud compute instance-groups managed delete-instances "$group" \
            --instances="$list" "$where" --quiet 2>&1); then
        case "$out" in
            *"not found"*|*"is not a member"*) echo "already gone: $out" >&2 ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
else
    gcloud compute instance-groups managed resize "$group" --size="$DROVER_DESIRED" "$where" --quiet
fi

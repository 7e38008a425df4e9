#!/bin/sh
# Drover autoscaler hook for an AWS Auto Scaling group (the `exec` hook).
#
#   hook:
#     exec: {command: ["deploy/hooks/aws-asg.sh"], timeout: 60s}
#
# The group is DROVER_ASG_NAME, else the pool's name. Needs the aws CLI and credentials allowed
# autoscaling:SetDesiredCapacity and autoscaling:TerminateInstanceInAutoScalingGroup.
# Drover gives the decision in DROVER_* variables (and as JSON on stdin, unused here):
#   scale-out: set-desired-capacity to DROVER_DESIRED (setting is idempotent, so a retried
#              decision launches nothing twice);
#   scale-in:  terminate exactly the drained instances in DROVER_REMOVE_INSTANCES, decrementing
#              the desired capacity with each (an instance already gone is not an error).
set -eu
group="${DROVER_ASG_NAME:-$DROVER_POOL}"
: "${DROVER_DESIRED:?}" "${DROVER_DECISION_ID:?}"
echo "drover decision $DROVER_DECISION_ID: $group -> $DROVER_DESIRED" >&2
if [ -n "${DROVER_REMOVE_INSTANCES:-}" ]; then
    for id in $DROVER_REMOVE_INSTANCES; do
        if ! out=$(aws autoscaling terminate-instance-in-auto-scaling-group \
                --instance-id "$id" --should-decrement-desired-capacity 2>&1); then
            case "$out" in
                *"not part of"*|*"not found"*|*"InvalidInstanceID"*)
                    echo "instance $id is already gone" >&2 ;;
                *) echo "$out" >&2; exit 1 ;;
            esac
        fi
    done
else
    aws autoscaling set-desired-capacity \
        --auto-scaling-group-name "$group" --desired-capacity "$DROVER_DESIRED"
fi

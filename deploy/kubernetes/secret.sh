#!/bin/sh
# Store a job identity made by `semoe ticket` as the Kubernetes Secret `semoe-job` (the two files
# the coordinator and the workers mount at /etc/semoe). Usage:
#
#   deploy/kubernetes/secret.sh [IDENTITY_DIR] [NAMESPACE]
#
# IDENTITY_DIR defaults to ./identity; NAMESPACE to the current context's namespace.
set -eu
dir=${1:-identity}
namespace=${2:-}
for f in job.identity join.ticket; do
  if [ ! -f "$dir/$f" ]; then
    echo "secret.sh: $dir/$f is missing; make it with: semoe ticket --out $dir --addr 127.0.0.1:7070" >&2
    exit 1
  fi
done
# --dry-run + apply: re-running the script replaces the Secret instead of failing.
kubectl create secret generic semoe-job \
  ${namespace:+--namespace "$namespace"} \
  --from-file=job.identity="$dir/job.identity" \
  --from-file=join.ticket="$dir/join.ticket" \
  --dry-run=client -o yaml | kubectl apply ${namespace:+--namespace "$namespace"} -f -

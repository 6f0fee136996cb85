#!/usr/bin/env bash
# Canary rollout of iamlet, as the kube2iam rollout guide does it: iamlet first on one
# tainted node, checked with a real pod and the AWS CLI, and only then on every node.
#
#   scripts/canary.sh <node> <test-role>
#
# <test-role> is a role (name or ARN) that the node's role may assume. The script labels and
# taints <node> (iamlet.io/canary=true:NoSchedule, so no other workload lands there), deploys
# manifests/overlays/canary (iamlet on that node only, and an AWS CLI pod with the role),
# and checks that the pod's identity is the role. On success it prints the commands that
# roll out everywhere; on failure it shows iamlet's logs, its rules and its explanation.
# Every kubectl command it runs is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ]; then
  echo "usage: $0 <node> <test-role>" >&2
  exit 2
fi
node=$1
role=$2
role_name=${role##*/}
ns=iamlet-canary

run() {
  printf '+ %s\n' "$*" >&2
  "$@"
}

run kubectl get node "$node" -o name >/dev/null
run kubectl label node "$node" iamlet.io/canary=true --overwrite
run kubectl taint node "$node" iamlet.io/canary=true:NoSchedule --overwrite
run kubectl apply -k manifests/overlays/canary
run kubectl -n "$ns" patch deployment aws-iam-tester-canary --type merge \
  -p "{\"spec\":{\"template\":{\"metadata\":{\"annotations\":{\"iam.amazonaws.com/role\":\"$role\"}}}}}"
run kubectl -n kube-system rollout status daemonset/iamlet-canary --timeout=180s
run kubectl -n "$ns" rollout status deployment/aws-iam-tester-canary --timeout=300s

arn=$(run kubectl -n "$ns" exec deploy/aws-iam-tester-canary -- \
  aws sts get-caller-identity --query Arn --output text) || arn=""
echo "the tester pod's identity: ${arn:-none}"

if [[ $arn == *":assumed-role/$role_name/"* ]]; then
  cat <<MSG

Canary passed: the pod on $node got the role $role_name through iamlet.
Roll out to every node (choose your CNI's component in manifests/overlays/production first):

  kubectl delete -k manifests/overlays/canary
  kubectl apply -k manifests/overlays/production
  kubectl -n kube-system rollout status daemonset/iamlet
  kubectl taint node $node iamlet.io/canary=true:NoSchedule-
  kubectl label node $node iamlet.io/canary-
MSG
  exit 0
fi

echo
echo "Canary FAILED: expected an assumed-role/$role_name identity. What iamlet says:" >&2
run kubectl -n kube-system logs daemonset/iamlet-canary --tail=50 || true
tester=$(run kubectl -n "$ns" get pod -l app.kubernetes.io/name=aws-iam-tester -o jsonpath='{.items[0].metadata.name}') || tester=""
if [ -n "$tester" ]; then
  run kubectl -n kube-system exec daemonset/iamlet-canary -- iamlet explain "$ns/$tester" --auto-discover-base-arn --use-regional-sts-endpoint --check-sts || true
fi
echo "iamlet's rules on $node (nft, then legacy):" >&2
run kubectl -n kube-system exec daemonset/iamlet-canary -- iptables-nft-save -t nat || true
run kubectl -n kube-system exec daemonset/iamlet-canary -- iptables-legacy-save -t nat || true
cat <<MSG >&2

Fix and run again, or remove the canary:
  kubectl delete -k manifests/overlays/canary
  kubectl taint node $node iamlet.io/canary=true:NoSchedule-
  kubectl label node $node iamlet.io/canary-
MSG
exit 1

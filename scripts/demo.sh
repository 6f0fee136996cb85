#!/usr/bin/env bash
# The local demo, as root on a Linux machine: a "node" and three "pods" in network namespaces,
# the fake Kubernetes API server and moto's STS on the node, and the real iamlet with real
# iptables, run as its DaemonSet's pod. The node registers with the startup taint, which
# iamlet removes once the node is protected. One pod has a role and gets its credentials
# through 169.254.169.254 with the AWS CLI; one runs as an IRSA-annotated ServiceAccount and
# gets that role (--service-account-roles); the last has none and gets nothing. Then iamlet
# is updated as a DaemonSet with maxSurge does it (the successor takes over the sockets, the
# cached credentials and the rules while a pod keeps asking: nothing is refused) and
# uninstalled (its rules go).
# iamlet runs as its image's container (podman, with the DaemonSet's security context) when
# podman is installed, as a process otherwise; the output says which.
# Everything is removed at the end, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (it creates network namespaces and iptables rules inside them)" >&2
  exit 1
fi

NODE=iamlet-demo-node
POD_APP=iamlet-demo-app
POD_PLAIN=iamlet-demo-plain
POD_IRSA=iamlet-demo-irsa
HOST_IP=10.254.0.1
API=http://$HOST_IP:6443
STS=http://$HOST_IP:5000
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  if [ "${CONTAINER:-}" = yes ]; then
    scripts/image.sh podman rm --force --time 0 iamlet-demo iamlet-demo-2 >/dev/null 2>&1 || true
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$POD_APP" "$POD_PLAIN" "$POD_IRSA" "$NODE"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_node() { ip netns exec "$NODE" "$@"; }
py() { .venv/bin/python "$@"; }

# Waits until something listens on $1:$2 inside the node namespace.
wait_port() {
  for _ in $(seq 1 150); do
    in_node bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo: nothing listens on $1:$2" >&2
  return 1
}

# `kubectl create -f -` against the fake API server: the API path of the collection, then the
# object as JSON on stdin.
create() {
  in_node .venv/bin/python -c '
import json, sys, urllib.request
api, path = sys.argv[1:3]
request = urllib.request.Request(api + path, data=sys.stdin.read().encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
created = json.load(urllib.request.urlopen(request))
kind, name = created["kind"].lower(), created["metadata"]["name"]
print(f"{kind}/{name} created")' "$API" "$1"
}

# The node's taints, as `kubectl get node demo-node -o jsonpath={.spec.taints}` shows them.
node_taints() {
  in_node .venv/bin/python -c '
import json, sys, urllib.request
node = json.load(urllib.request.urlopen(sys.argv[1] + "/api/v1/nodes/demo-node"))
print(json.dumps(node["spec"].get("taints") or []))' "$API"
}

# Launches iamlet as the DaemonSet's pod named $1, logging to $WORK/$1.log: the PID of the
# process (or of podman, attached to the container) in $IAMLET, its name in $IAMLET_NAME.
# The node's state directory (/run/iamlet on a node) is the demo's own.
launch_iamlet() {
  IAMLET_NAME=$1
  local env=(AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    AWS_ENDPOINT_URL_STS="$STS" POD_NAMESPACE=kube-system POD_NAME="$IAMLET_NAME")
  local args=(--node=demo-node --api-server="$API" --host-ip="$HOST_IP" --iptables --host-interface=auto
    --base-role-arn=arn:aws:iam::123456789012:role/ --service-account-roles)
  if [ "$CONTAINER" = yes ]; then
    # The DaemonSet's security context and mounts, from the rendered manifest, their host
    # paths made ready as kubelet makes them; the demo's CNI configuration directory where
    # the DaemonSet mounts the node's.
    local flags
    mapfile -t flags < <(scripts/image.sh run-flags --host-path="/etc/cni/net.d=$WORK/cni" \
      --host-path="/var/lib/cni/results=$WORK/cni-results" --host-path="/run/iamlet=$WORK/state")
    [ "${#flags[@]}" -gt 0 ] || { echo "demo: no podman flags from the DaemonSet (see above)" >&2; exit 1; }
    local envs=()
    for pair in "${env[@]}"; do envs+=(--env "$pair"); done
    scripts/image.sh podman run --rm --pull=never --name "$IAMLET_NAME" --network "ns:/run/netns/$NODE" \
      --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "${flags[@]}" "${envs[@]}" localhost/iamlet:demo \
      "${args[@]}" --cni-conf-dir=/etc/cni/net.d --cni-results-dir=/var/lib/cni/results \
      --state-dir=/run/iamlet >"$WORK/$IAMLET_NAME.log" 2>&1 &
  else
    ip netns exec "$NODE" env -i PATH="$PATH" "${env[@]}" "$BIN" "${args[@]}" --cni-conf-dir="$WORK/cni" \
      --cni-results-dir="$WORK/cni-results" --state-dir="$WORK/state" >"$WORK/$IAMLET_NAME.log" 2>&1 &
  fi
  IAMLET=$!
  PIDS+=("$IAMLET")
}

# Starts iamlet as the DaemonSet's pod and waits until it is ready.
start_iamlet() {
  launch_iamlet iamlet-demo
  for _ in $(seq 1 150); do
    in_node .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://$HOST_IP:8182/readyz', timeout=1)" 2>/dev/null && return 0
    kill -0 "$IAMLET" 2>/dev/null || { cat "$WORK/$IAMLET_NAME.log"; exit 1; }
    sleep 0.2
  done
  echo "demo: iamlet was not ready in 30 s" >&2
  cat "$WORK/$IAMLET_NAME.log"
  exit 1
}

# Stops iamlet as Kubernetes would (SIGTERM; `podman stop` for the container) and shows what
# it logged while stopping.
stop_iamlet() {
  local lines status=0
  lines=$(wc -l <"$WORK/$IAMLET_NAME.log")
  if [ "$CONTAINER" = yes ]; then
    scripts/image.sh podman stop --time 30 "$IAMLET_NAME" >/dev/null
  else
    kill -TERM "$IAMLET"
  fi
  wait "$IAMLET" || status=$?
  tail -n +"$((lines + 1))" "$WORK/$IAMLET_NAME.log" | sed 's/^/  iamlet | /'
  echo "iamlet exited $status"
}

# The DaemonSet's pod named $1 on the node, as the DaemonSet controller creates it.
agent_pod() {
  echo '{"metadata": {"name": "'"$1"'", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "iamlet", "uid": "demo", "controller": true}]}, "spec": {"nodeName": "demo-node", "hostNetwork": true, "containers": [{"name": "iamlet", "image": "iamlet"}]}, "status": {"phase": "Running", "podIP": "'"$HOST_IP"'"}}' |
    create /api/v1/namespaces/kube-system/pods
}

# iamlet's rules in the node's nat and filter tables.
our_rules() {
  { in_node iptables-save -t nat 2>/dev/null; in_node iptables-save -t filter 2>/dev/null; } | grep -E 'IAMLET' || true
}

# The AWS CLI in a pod (the one with a role unless named).
cli_in_app_pod() {
  local pod=${1:-$POD_APP}
  echo "(pod $pod)\$ aws sts get-caller-identity --region us-east-1 --endpoint-url $STS"
  ip netns exec "$pod" env -i PATH="$PATH" HOME=/nonexistent \
    .venv/bin/aws sts get-caller-identity --region us-east-1 --endpoint-url "$STS" --output json
}

# `kubectl create` against the fake API server: namespace, name, IP, role annotation (may be
# empty), ServiceAccount (default unless given).
create_pod() {
  in_node .venv/bin/python - "$API" "$@" <<'PY'
import json, sys, urllib.request
api, ns, name, ip, role = sys.argv[1:6]
account = sys.argv[6] if len(sys.argv) > 6 else "default"
pod = {"metadata": {"name": name, "annotations": {"iam.amazonaws.com/role": role} if role else {}},
       "spec": {"nodeName": "demo-node", "serviceAccountName": account,
                "containers": [{"name": "app", "image": "amazon/aws-cli"}]},
       "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
request = urllib.request.Request(f"{api}/api/v1/namespaces/{ns}/pods", data=json.dumps(pod).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
created = json.load(urllib.request.urlopen(request))
print(f"pod/{created['metadata']['name']} created in {ns} (ip {ip}, role annotation {role or 'none'}, "
      f"serviceaccount {account})")
PY
}

step "Installing what the demo needs and building iamlet"
scripts/install-test-deps.sh
cargo build --quiet --bin iamlet --example fake_apiserver
TARGET=$(realpath "${CARGO_TARGET_DIR:-target}")
BIN=$TARGET/debug/iamlet
CONTAINER=no
if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then
  CONTAINER=yes
  scripts/image.sh build "$BIN" localhost/iamlet:demo
fi

step "A node namespace with a cni0 bridge (flannel-style), and three pod namespaces"
for ns in "$NODE" "$POD_APP" "$POD_PLAIN" "$POD_IRSA"; do ip netns del "$ns" 2>/dev/null || true; ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$NODE" link add eth0 type veth peer name uplink0
ip -n "$NODE" link set uplink0 up
ip -n "$NODE" addr add "$HOST_IP/32" dev eth0
ip -n "$NODE" link set eth0 up
ip -n "$NODE" link add cni0 type bridge
ip -n "$NODE" addr add 10.42.0.1/24 dev cni0
ip -n "$NODE" link set cni0 up
# What libcni keeps after each pod's CNI ADD (containerd and CRI-O write it to
# /var/lib/cni/results): the host veth, the pod's MAC and address. iamlet binds each pod's
# address to its port from it (--bind-pod-ports).
mkdir -p "$WORK/cni-results"
mac() { ip -n "$1" -o link show "$2" | sed -n 's|.*link/ether \([0-9a-f:]*\).*|\1|p'; }
n=0
for pod in "$POD_APP:10.42.0.10:web" "$POD_PLAIN:10.42.0.11:batch" "$POD_IRSA:10.42.0.12:reports"; do
  IFS=: read -r ns ip name <<<"$pod"
  n=$((n + 1))
  ip -n "$NODE" link add "veth$n" type veth peer name eth0 netns "$ns"
  ip -n "$NODE" link set "veth$n" master cni0 up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 10.42.0.1
  cat >"$WORK/cni-results/cbr0-demo$n-eth0" <<EOF
{"kind":"cniCacheV1","containerId":"demo$n","ifName":"eth0","networkName":"cbr0",
 "cniArgs":[["K8S_POD_NAMESPACE","shop"],["K8S_POD_NAME","$name"]],
 "result":{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"$(mac "$NODE" cni0)"},
   {"name":"veth$n","mac":"$(mac "$NODE" "veth$n")"},
   {"name":"eth0","mac":"$(mac "$ns" eth0)","sandbox":"/var/run/netns/$ns"}],
   "ips":[{"interface":2,"address":"$ip/24","gateway":"10.42.0.1"}]}}
EOF
  echo "$ns: $ip on the node's cni0 (port veth$n, MAC $(mac "$ns" eth0))"
done

step "Starting moto (STS) and the fake Kubernetes API server on the node"
# Started with `ip netns exec` itself, not a shell function, so $! is the server's own PID.
ip netns exec "$NODE" .venv/bin/moto_server -H "$HOST_IP" -p 5000 >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
ip netns exec "$NODE" "$TARGET/debug/examples/fake_apiserver" --listen "$HOST_IP:6443" >"$WORK/apiserver.log" 2>&1 &
PIDS+=($!)
wait_port "$HOST_IP" 5000
wait_port "$HOST_IP" 6443
echo "STS at $STS, API server at $API"

step "Registering the node with the startup taint; iamlet's DaemonSet and its pod on the node"
mkdir -p "$WORK/cni"
echo '{"metadata": {"name": "demo-node"}, "spec": {"taints": [{"key": "iamlet.io/agent-not-ready", "effect": "NoSchedule"}]}}' |
  create /api/v1/nodes
echo '{"metadata": {"name": "iamlet"}, "spec": {"selector": {"matchLabels": {"app": "iamlet"}}, "template": {"metadata": {"labels": {"app": "iamlet"}}, "spec": {"hostNetwork": true, "tolerations": [{"operator": "Exists"}], "containers": [{"name": "iamlet", "image": "iamlet"}]}}}}' |
  create /apis/apps/v1/namespaces/kube-system/daemonsets
agent_pod iamlet-demo
echo "node taints: $(node_taints)"

if [ "$CONTAINER" = yes ]; then
  step "Starting iamlet with --iptables on the node, as its image's container (podman, the DaemonSet's security context)"
else
  step "Starting iamlet with --iptables on the node, as a process (podman is not installed)"
fi
start_iamlet
sed 's/^/  iamlet | /' "$WORK/iamlet-demo.log"
echo "iamlet's rules in the node's nat and filter tables (the DNAT, and the backstop refusing what is not redirected):"
our_rules | sed 's/^/  /'
echo "iamlet's pod port binding (nftables, from the CNI's records): each pod's address is accepted only from its own port and MAC:"
ip netns exec "$NODE" nft list set bridge iamlet bound4 | sed -n '/elements/,/}/p' | sed 's/^[[:space:]]*/  /'
for _ in $(seq 1 50); do [ "$(node_taints)" = "[]" ] && break; sleep 0.1; done
echo "node taints once iamlet is ready: $(node_taints)"

step "Creating a pod with the role 'demo-app', one without a role, and one whose ServiceAccount has IRSA's annotation"
create_pod shop web "10.42.0.10" demo-app
create_pod shop batch "10.42.0.11" ""
echo '{"metadata": {"name": "reports", "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/demo-reports"}}}' |
  create /api/v1/namespaces/shop/serviceaccounts
create_pod shop reports "10.42.0.12" "" reports

step "In the pod with a role: the AWS CLI, with no configuration at all"
cli_in_app_pod
echo "The metadata API as the pod sees it (IMDSv2):"
ip netns exec "$POD_APP" .venv/bin/python - <<'PY'
import json, urllib.request
base = "http://169.254.169.254/latest"
token = urllib.request.urlopen(urllib.request.Request(f"{base}/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read().decode()
get = lambda path: urllib.request.urlopen(urllib.request.Request(f"{base}/{path}",
        headers={"X-aws-ec2-metadata-token": token})).read().decode()
role = get("meta-data/iam/security-credentials/")
doc = json.loads(get(f"meta-data/iam/security-credentials/{role}"))
doc["SecretAccessKey"] = doc["SecretAccessKey"][:4] + "..."
doc["Token"] = doc["Token"][:12] + "..."
print(f"  GET meta-data/iam/security-credentials/ -> {role}")
print("  " + json.dumps(doc, indent=2).replace("\n", "\n  "))
PY

step "In the pod whose ServiceAccount names a role (IRSA's annotation, no OIDC provider needed): that role"
cli_in_app_pod "$POD_IRSA" | tee "$WORK/irsa.json"
grep -q 'assumed-role/demo-reports/shop.reports' "$WORK/irsa.json" || {
  echo "demo: the pod did not get its ServiceAccount's role" >&2
  exit 1
}

step "In the pod without a role: no credentials, and never the node's"
if ip netns exec "$POD_PLAIN" env -i PATH="$PATH" HOME=/nonexistent AWS_METADATA_SERVICE_TIMEOUT=2 \
  .venv/bin/aws sts get-caller-identity --region us-east-1 --endpoint-url "$STS" 2>"$WORK/plain.err"; then
  echo "demo: the pod without a role got credentials" >&2
  exit 1
fi
sed 's/^/  aws: /' "$WORK/plain.err"
ip netns exec "$POD_PLAIN" .venv/bin/python -c "
import urllib.request, urllib.error
try: urllib.request.urlopen('http://169.254.169.254/latest/meta-data/iam/security-credentials/')
except urllib.error.HTTPError as e: print('  GET meta-data/iam/security-credentials/ ->', e.code, e.read().decode().strip())"

step "A rolling update with maxSurge: the successor starts beside iamlet and takes over its sockets, cached credentials and rules, while the pod keeps asking with the token it took before"
# The pod: one IMDSv2 token (6 hours), then its credentials every 10 ms on a new connection,
# until the stop file appears; every refusal and error answer is counted.
ip netns exec "$POD_APP" .venv/bin/python -c "
import os, sys, time, urllib.request
base = 'http://169.254.169.254/latest'
token = urllib.request.urlopen(urllib.request.Request(base + '/api/token', method='PUT',
    headers={'X-aws-ec2-metadata-token-ttl-seconds': '21600'}), timeout=2).read().decode()
served, failed = 0, []
while not os.path.exists(sys.argv[1]):
    try:
        request = urllib.request.Request(base + '/meta-data/iam/security-credentials/demo-app',
                                         headers={'X-aws-ec2-metadata-token': token, 'Connection': 'close'})
        urllib.request.urlopen(request, timeout=2).read()
        served += 1
    except Exception as error:
        failed.append(repr(error))
    time.sleep(0.01)
print(f'  (pod) {served} answers during the update, {len(failed)} refused or failed, with its token from before', failed[:3])
sys.exit(1 if failed or not served else 0)" "$WORK/stop-asking" &
ASKING=$!
PREDECESSOR=$IAMLET PREDECESSOR_NAME=$IAMLET_NAME
agent_pod iamlet-demo-2
launch_iamlet iamlet-demo-2
for _ in $(seq 1 150); do
  grep -q "took over from the predecessor" "$WORK/$IAMLET_NAME.log" && break
  kill -0 "$IAMLET" 2>/dev/null || { cat "$WORK/$IAMLET_NAME.log"; exit 1; }
  sleep 0.2
done
grep -q "took over from the predecessor" "$WORK/$IAMLET_NAME.log" || { echo "demo: no takeover in 30 s" >&2; cat "$WORK/$IAMLET_NAME.log"; exit 1; }
grep -E "hand-over|adopted|took over|token key" "$WORK/$IAMLET_NAME.log" | sed 's/^/  successor | /'
SUCCESSOR=$IAMLET SUCCESSOR_NAME=$IAMLET_NAME
IAMLET=$PREDECESSOR IAMLET_NAME=$PREDECESSOR_NAME
echo "The DaemonSet controller then stops the old pod (SIGTERM): it exits, keeping the rules for its successor"
stop_iamlet
IAMLET=$SUCCESSOR IAMLET_NAME=$SUCCESSOR_NAME
touch "$WORK/stop-asking"
wait "$ASKING" || { echo "demo: the pod noticed the update" >&2; exit 1; }
echo "One set of rules, the successor's:"
our_rules | sed 's/^/  /'
cli_in_app_pod

step "Uninstall: the DaemonSet is deleted, then iamlet gets SIGTERM. It removes every rule"
in_node .venv/bin/python -c "
import urllib.request
urllib.request.urlopen(urllib.request.Request('$API/apis/apps/v1/namespaces/kube-system/daemonsets/iamlet', method='DELETE'))
print('daemonset.apps/iamlet deleted')"
stop_iamlet
if [ -n "$(our_rules)" ]; then
  echo "demo: rules left behind after the uninstall" >&2
  exit 1
fi
echo "no IAMLET rules left in the node's nat or filter table"

step "Done: removing the namespaces"

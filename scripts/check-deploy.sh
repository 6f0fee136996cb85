#!/usr/bin/env bash
# Checks the deployment files: every kustomization renders, and the Helm chart lints and
# renders (scripts/check-chart.py); the results validate against the
# Kubernetes schemas, the manifest security scan (checkov) passes (each accepted finding is
# justified in a checkov.io/skip annotation), the Dockerfile passes hadolint and the scripts
# pass shellcheck. Run by scripts/test.sh; needs scripts/install-test-deps.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.33.0
tools=.venv-deploy/bin
out=target/deploy-check
rm -rf "$out"
mkdir -p "$out"

render() { # name, kustomization directory
  kubectl kustomize --load-restrictor=LoadRestrictionsNone "$2" >"$out/$1.yaml"
  echo "rendered $2 -> $out/$1.yaml ($(grep -c '^kind:' "$out/$1.yaml") objects)"
}

render base manifests/base
render production manifests/overlays/production
render canary manifests/overlays/canary
# Each component, on top of the base, as an operator's overlay would use it.
for component in manifests/components/*/; do
  name=$(basename "$component")
  dir=$out/overlay-$name
  mkdir -p "$dir"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../manifests/base\ncomponents:\n  - ../../../%s\n' "${component%/}" >"$dir/kustomization.yaml"
  render "$name" "$dir"
done
grep -q 'value: cali+' "$out/cni-calico.yaml" || { echo "the calico component did not set the interface" >&2; exit 1; }
grep -q 'IAMLET_IPTABLES_KEEP_ON_EXIT' "$out/fail-closed.yaml" || { echo "the fail-closed component did nothing" >&2; exit 1; }

# The monitoring component's custom resources have no schema in kubernetes-validate: check
# that its pieces find each other instead. The Service selects iamlet's pods and targets
# their admin port (by number: the DaemonSet declares no container ports, or a surge pod
# would stay Pending beside its predecessor), the one the probes use; the ServiceMonitor
# selects the Service and names one of its ports.
# (tests/it/monitoring.rs checks the alerts' metric names against what iamlet exports.)
"$tools/python" - "$out/monitoring.yaml" <<'PY'
import sys, yaml
objects = {o["kind"]: o for o in yaml.safe_load_all(open(sys.argv[1])) if o}
def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())
daemonset, service, monitor = objects["DaemonSet"], objects["Service"], objects["ServiceMonitor"]
template = daemonset["spec"]["template"]
container = template["spec"]["containers"][0]
assert not container.get("ports"), "the DaemonSet declares container ports: a surge pod would stay Pending (kubernetes#106417)"
strategy = daemonset["spec"]["updateStrategy"]["rollingUpdate"]
assert (strategy.get("maxSurge"), strategy.get("maxUnavailable")) == (1, 0), f"not a surge update: {strategy}"
admin_port = container["readinessProbe"]["httpGet"]["port"]
assert container["livenessProbe"]["httpGet"]["port"] == admin_port
assert selects(service["spec"]["selector"], template["metadata"]["labels"]), "the Service selects no iamlet pod"
assert all(p["targetPort"] == admin_port for p in service["spec"]["ports"]), "the Service targets another port than the probes'"
assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]), "the ServiceMonitor selects no Service"
service_ports = {p["name"] for p in service["spec"]["ports"]}
assert all(e["port"] in service_ports for e in monitor["spec"]["endpoints"]), "the ServiceMonitor names no Service port"
assert objects["PrometheusRule"]["spec"]["groups"][0]["rules"], "no alerts"
print("monitoring: the Service selects iamlet's admin port, the ServiceMonitor selects the Service")
PY

# The Helm chart, with real Helm: lint, renders (into $out, validated and scanned below with
# the rest), schema, and no drift from the kustomize base.
"$tools/python" scripts/check-chart.py "$out"

"$tools/kubernetes-validate" --kubernetes-version "$KUBERNETES_VERSION" --strict --quiet "$out"/*.yaml
echo "kubernetes-validate: every rendered object is valid for Kubernetes $KUBERNETES_VERSION"

# --skip-download: no call home; the checks are all in the package.
files=()
for f in "$out"/*.yaml; do files+=(-f "$f"); done
"$tools/checkov" --framework kubernetes --skip-download --compact --quiet "${files[@]}"
echo "checkov: no unjustified findings"

"$tools/hadolint" Dockerfile
echo "hadolint: Dockerfile clean"

"$tools/shellcheck" scripts/*.sh .ci/run
echo "shellcheck: scripts clean"

"""Checks the Helm chart with real Helm (helm-python-sdk: Helm 4's Go code, no binary, offline).

Run by scripts/check-deploy.sh with .venv-deploy's Python, after the kustomize renders:

- `helm lint --strict` finds nothing worse than information;
- the chart renders with its defaults, with each CNI, with the canary values and with a
  values file written as a kube2iam chart user writes one; each render is written to the
  output directory, where kubernetes-validate and checkov check it with the rest;
- the schema refuses a wrong type and an unknown top-level key, with Helm's message;
- the default render's DaemonSet, RBAC and ServiceAccount equal the kustomize base's, except
  for Helm's labels, so the two never drift;
- the kube2iam-style render has the flags and interface such a user means.

Usage: check-chart.py OUTPUT_DIR (the kustomize base's render is OUTPUT_DIR/base.yaml).
       check-chart.py --args OUTPUT_DIR   only the renders, and OUTPUT_DIR/helm-args.json:
                                          each render's agent arguments (tests/it/cli.rs starts
                                          the agent's flag parsing with them)
"""

import copy
import json
import sys
from pathlib import Path

import yaml
import helm_python as helm

CHART = Path("charts/iamlet")
# The labels Helm (and kustomize's part-of) add; everything else must be equal.
ADDED_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
}
CNIS = {
    "aws-vpc-cni": "eni+,vlan+",
    "calico": "cali+",
    "cilium": "lxc+",
    "flannel": "cni0",
    "kube-router": "kube-bridge",
    "weave": "weave",
}


def fail(message):
    print(f"check-chart: {message}", file=sys.stderr)
    sys.exit(1)


def render(chart, out, name, values, release="iamlet"):
    """Renders the chart with `values`, writes OUT/helm-NAME.yaml, returns its objects."""
    try:
        rendered = chart.render(values, name=release, namespace="kube-system", is_install=True)
    except helm.HelmError as error:
        fail(f"{name}: {error}")
    documents = [
        text for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt") and text.strip()
    ]
    (out / f"helm-{name}.yaml").write_text("\n---\n".join(documents))
    objects = [o for text in documents for o in yaml.safe_load_all(text) if o]
    print(f"rendered the chart ({name}) -> {out}/helm-{name}.yaml ({len(objects)} objects)")
    return objects


def find(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    if len(found) != 1:
        fail(f"expected one {kind}, found {len(found)}")
    return found[0]


def without_added_labels(obj):
    """`obj` with Helm's and kustomize's labels removed wherever labels are."""
    obj = copy.deepcopy(obj)

    def strip(labels):
        for key in ADDED_LABELS:
            labels.pop(key, None)

    strip(obj["metadata"].get("labels", {}))
    spec = obj.get("spec", {})
    if "selector" in spec:
        strip(spec["selector"].get("matchLabels", {}))
    if "template" in spec:
        strip(spec["template"]["metadata"].get("labels", {}))
    return obj


def env_value(daemonset, name):
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def args(daemonset):
    return daemonset["spec"]["template"]["spec"]["containers"][0]["args"]


def render_all(chart, out):
    """Every render the checks look at, by name."""
    renders = {"default": render(chart, out, "default", {})}
    for cni in CNIS:
        renders[f"cni-{cni}"] = render(chart, out, f"cni-{cni}", {"cni": cni})
    canary_values = yaml.safe_load((CHART / "ci/canary-values.yaml").read_text())
    renders["canary"] = render(chart, out, "canary", canary_values, release="iamlet-canary")
    kube2iam_values = yaml.safe_load((CHART / "ci/kube2iam-values.yaml").read_text())
    renders["kube2iam"] = render(chart, out, "kube2iam", kube2iam_values)
    return renders


def main():
    if sys.argv[1] == "--args":
        out = Path(sys.argv[2])
        renders = render_all(helm.Chart.load(str(CHART)), out)
        (out / "helm-args.json").write_text(
            json.dumps({name: args(find(objects, "DaemonSet")) for name, objects in renders.items()}, indent=1)
        )
        return
    out = Path(sys.argv[1])
    report = helm.lint(str(CHART), strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    if problems:
        fail(f"helm lint --strict: {json.dumps(problems, indent=1)}")
    notes = [m["error"] for m in report["messages"]]
    print(f"helm lint --strict: no warnings or errors ({len(notes)} notes: {'; '.join(notes)})")

    chart = helm.Chart.load(str(CHART))
    renders = render_all(chart, out)
    defaults = renders["default"]
    for cni, interface in CNIS.items():
        if env_value(find(renders[f"cni-{cni}"], "DaemonSet"), "IAMLET_HOST_INTERFACE") != interface:
            fail(f"cni={cni} did not set the interface to {interface}")
    canary = find(renders["canary"], "DaemonSet")
    if canary["spec"]["template"]["spec"].get("nodeSelector") != {"iamlet.io/canary": "true"}:
        fail("the canary values do not confine iamlet to the canary node")
    kube2iam = find(renders["kube2iam"], "DaemonSet")

    for bad, what in [({"host": {"port": "eighty"}}, "a wrong type"), ({"hostt": {"port": 8181}}, "an unknown key")]:
        try:
            chart.validate_schema(bad)
        except helm.HelmError as error:
            print(f"the schema refuses {what}: {' '.join(str(error).split())}")
        else:
            fail(f"the schema accepted {what}: {bad}")

    base = [o for o in yaml.safe_load_all(open(out / "base.yaml")) if o]
    for kind in ["DaemonSet", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"]:
        ours, theirs = without_added_labels(find(defaults, kind)), without_added_labels(find(base, kind))
        if ours != theirs:
            fail(
                f"the chart's default {kind} differs from the kustomize base's:\n"
                f"chart: {json.dumps(ours, indent=1, sort_keys=True)}\n"
                f"base:  {json.dumps(theirs, indent=1, sort_keys=True)}"
            )
    print("the default render's DaemonSet, RBAC and ServiceAccount equal the kustomize base's (but for labels)")

    flags = args(kube2iam)
    expected = ["--base-role-arn=arn:aws:iam::123456789012:role/", "--auto-discover-default-role=true", "--iptables"]
    if not all(flag in flags for flag in expected) or "--auto-discover-base-arn" in flags:
        fail(f"the kube2iam values gave the flags {flags}")
    if env_value(kube2iam, "IAMLET_HOST_INTERFACE") != "cali+":
        fail("the kube2iam values' host.interface was lost")
    print("the kube2iam-style values render the flags and interface they mean")


if __name__ == "__main__":
    main()

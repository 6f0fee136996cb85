"""The iamlet container of a rendered DaemonSet manifest (on stdin), as `podman run` flags.

The one place that turns the DaemonSet into podman flags, for the demo and the test kit
alike (through `scripts/image.sh run-flags`): the container's security context
(capabilities, read-only root, no privilege escalation, user) and its hostPath mounts.

hostPath volumes are prepared as kubelet prepares them, by their `type`, before the flags
are printed, so a freshly booted host (an empty /run) behaves as a node does:

- `DirectoryOrCreate`: a missing directory is created (mode 0755, parents too);
- `FileOrCreate`: a missing file is created empty (mode 0644); its directory must exist,
  as kubelet does not create it;
- `Directory`, `File`, `Socket`, `CharDevice`, `BlockDevice`: the path must exist and be
  of that kind, or the pod does not start: this exits 1 naming the volume and the path;
- no type (or ""): nothing is checked.

    python3 scripts/podman-flags.py [--host-path MOUNT_PATH=HOST_PATH]... < rendered.yaml

`--host-path` gives the volume mounted at MOUNT_PATH another host path (the demo's CNI
configuration directory instead of the node's /etc/cni/net.d); its type still applies.
"""

import argparse
import os
import stat
import sys

import yaml

KINDS = {
    "Directory": (stat.S_ISDIR, "a directory"),
    "File": (stat.S_ISREG, "a file"),
    "Socket": (stat.S_ISSOCK, "a socket"),
    "CharDevice": (stat.S_ISCHR, "a character device"),
    "BlockDevice": (stat.S_ISBLK, "a block device"),
}


class Refused(Exception):
    """A hostPath kubelet would not mount: the pod would not start."""


def prepare(name, path, kind):
    """Makes `path` ready as kubelet makes a hostPath volume of type `kind`, or refuses."""
    if kind in ("", None):
        return
    declared = kind
    if kind == "DirectoryOrCreate":
        if not os.path.exists(path):
            os.makedirs(path, mode=0o755, exist_ok=True)
        kind = "Directory"
    elif kind == "FileOrCreate":
        if not os.path.exists(path):
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                raise Refused(f"volume {name}: hostPath {path} (FileOrCreate): its directory {parent} does not exist, "
                              "and kubelet does not create it")
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        kind = "File"
    if kind not in KINDS:
        raise Refused(f"volume {name}: hostPath type {kind!r} is not one kubelet knows")
    is_kind, what = KINDS[kind]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise Refused(f"volume {name}: hostPath {path} (type {declared}) does not exist") from None
    if not is_kind(mode):
        raise Refused(f"volume {name}: hostPath {path} (type {declared}) is not {what}")


def flags(manifest, host_paths):
    daemonset = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "iamlet")
    context = container.get("securityContext", {})
    capabilities = context.get("capabilities", {})
    out = []
    if capabilities.get("drop"):
        out.append("--cap-drop=" + ",".join(capabilities["drop"]).lower())
    if capabilities.get("add"):
        out.append("--cap-add=" + ",".join(capabilities["add"]).lower())
    if context.get("readOnlyRootFilesystem"):
        out.append("--read-only")
    if context.get("allowPrivilegeEscalation") is False:
        out.append("--security-opt=no-new-privileges")
    if context.get("privileged"):
        out.append("--privileged")
    if "runAsUser" in context:
        out.append("--user=%d" % context["runAsUser"])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = container.get("volumeMounts", [])
    unknown = set(host_paths) - {m["mountPath"] for m in mounts if volumes[m["name"]].get("hostPath")}
    if unknown:
        raise Refused("--host-path names no hostPath mount of the container: " + ", ".join(sorted(unknown)))
    for mount in mounts:
        host = volumes[mount["name"]].get("hostPath")
        if not host:
            continue
        path = host_paths.get(mount["mountPath"], host["path"])
        try:
            prepare(mount["name"], path, host.get("type"))
        except OSError as error:
            raise Refused(f"volume {mount['name']}: hostPath {path} ({host.get('type')}): {error}") from None
        out.append("--volume=%s:%s%s" % (path, mount["mountPath"], ":ro" if mount.get("readOnly") else ""))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-path", action="append", default=[], metavar="MOUNT_PATH=HOST_PATH")
    args = parser.parse_args()
    host_paths = {}
    for pair in args.host_path:
        mount_path, sep, host_path = pair.partition("=")
        if not sep or not mount_path or not host_path:
            parser.error(f"--host-path {pair!r}: expected MOUNT_PATH=HOST_PATH")
        host_paths[mount_path] = host_path
    try:
        print("\n".join(flags(sys.stdin, host_paths)))
    except Refused as refused:
        print(f"podman-flags: {refused}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

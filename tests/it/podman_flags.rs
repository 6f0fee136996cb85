//! `scripts/podman-flags.py`, the one place that turns the DaemonSet's container into podman
//! flags for the demo and the test kit: each hostPath `type` is honoured as kubelet honours
//! it, so the demo on a freshly booted host (no /run/xtables.lock yet) runs as a node would,
//! and a missing path the manifest requires stops it with a clear message.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use iamlet_testkit::repo_root;

/// A DaemonSet whose iamlet container mounts one hostPath of each `(name, path, type)`.
fn daemonset(volumes: &[(&str, &Path, &str)]) -> String {
    let mounts: Vec<String> = volumes
        .iter()
        .map(|(name, _, _)| format!("{{\"name\": \"{name}\", \"mountPath\": \"/mnt/{name}\"}}"))
        .collect();
    let host_paths: Vec<String> = volumes
        .iter()
        .map(|(name, path, kind)| {
            format!(
                "{{\"name\": \"{name}\", \"hostPath\": {{\"path\": \"{}\", \"type\": \"{kind}\"}}}}",
                path.display()
            )
        })
        .collect();
    format!(
        "{{\"kind\": \"DaemonSet\", \"spec\": {{\"template\": {{\"spec\": {{\"containers\": [{{\"name\": \"iamlet\", \
         \"volumeMounts\": [{}]}}], \"volumes\": [{}]}}}}}}}}",
        mounts.join(", "),
        host_paths.join(", ")
    )
}

/// Runs the script on `manifest` with `args`: its exit status, stdout and stderr.
fn podman_flags(manifest: &str, args: &[String]) -> (bool, String, String) {
    let mut child = Command::new(repo_root().join(".venv-deploy/bin/python"))
        .arg(repo_root().join("scripts/podman-flags.py"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(".venv-deploy: run scripts/install-test-deps.sh");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), manifest.as_bytes()).unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn or_create_types_create_what_is_missing_as_kubelet_does() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("run/xtables.lock");
    let conf = dir.path().join("etc/cni/net.d");
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let manifest = daemonset(&[("lock", &lock, "FileOrCreate"), ("conf", &conf, "DirectoryOrCreate")]);

    let (ok, flags, stderr) = podman_flags(&manifest, &[]);
    assert!(ok, "{stderr}");
    let lock_meta = std::fs::metadata(&lock).expect("FileOrCreate creates the missing file");
    assert!(lock_meta.is_file() && lock_meta.len() == 0);
    assert_eq!(lock_meta.permissions().mode() & 0o777, 0o644);
    assert!(std::fs::metadata(&conf).expect("DirectoryOrCreate creates it, parents too").is_dir());
    assert_eq!(
        flags.lines().collect::<Vec<_>>(),
        [format!("--volume={}:/mnt/lock", lock.display()), format!("--volume={}:/mnt/conf", conf.display())]
    );

    // Present already: kept as it is.
    std::fs::write(&lock, "held").unwrap();
    assert!(podman_flags(&manifest, &[]).0);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "held");
}

#[test]
fn strict_types_refuse_a_missing_or_wrong_path_naming_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let a_dir = dir.path().join("a-dir");
    std::fs::create_dir(&a_dir).unwrap();
    for (kind, path, says) in [
        ("File", &missing, "does not exist"),
        ("Directory", &missing, "does not exist"),
        ("Socket", &missing, "does not exist"),
        ("File", &a_dir, "is not a file"),
        ("Socket", &a_dir, "is not a socket"),
        ("FileOrCreate", &dir.path().join("no-parent/x.lock"), "does not exist, and kubelet does not create it"),
        ("DirectoryOrCreate", &dir.path().join("a-dir"), ""),
        ("Sideways", &a_dir, "not one kubelet knows"),
    ] {
        let (ok, flags, stderr) = podman_flags(&daemonset(&[("vol", path, kind)]), &[]);
        if says.is_empty() {
            assert!(ok, "{kind} {}: {stderr}", path.display());
            continue;
        }
        assert!(!ok, "{kind} {} was accepted: {flags}", path.display());
        assert!(stderr.contains("volume vol") && stderr.contains(says), "{kind} {}: {stderr}", path.display());
        assert!(!stderr.contains("Traceback"), "a clear message, not a crash: {stderr}");
        assert!(!missing.exists(), "{kind}: nothing is created for a strict type");
    }

    // A socket that is there is mounted.
    let socket = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (ok, _, stderr) = podman_flags(&daemonset(&[("sock", &socket, "Socket")]), &[]);
    assert!(ok, "{stderr}");
    // No type: nothing checked, nothing created.
    let (ok, _, stderr) = podman_flags(&daemonset(&[("any", &missing, "")]), &[]);
    assert!(ok && !missing.exists(), "{stderr}");
}

/// The base manifest, as the demo and the test kit use it: its lock (FileOrCreate) and CNI
/// directory (DirectoryOrCreate) moved into a directory of the test's, as on a host where
/// neither exists yet.
#[test]
fn the_base_manifests_mounts_are_made_on_a_fresh_host() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let lock = run.join("xtables.lock");
    let conf = dir.path().join("cni");
    let results = dir.path().join("cni-results");
    let state = run.join("iamlet");
    let overrides = [
        format!("--host-path=/run/xtables.lock={}", lock.display()),
        format!("--host-path=/etc/cni/net.d={}", conf.display()),
        format!("--host-path=/var/lib/cni/results={}", results.display()),
        format!("--host-path=/run/iamlet={}", state.display()),
    ];
    let run_flags = || {
        let output =
            Command::new(repo_root().join("scripts/image.sh")).arg("run-flags").args(&overrides).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // The lock's directory is /run itself on a node: kubelet never creates it, nor does this.
    let (ok, _, stderr) = run_flags();
    assert!(!ok && stderr.contains("volume xtables-lock"), "{stderr}");

    std::fs::create_dir(&run).unwrap();
    let (ok, flags, stderr) = run_flags();
    assert!(ok, "{stderr}");
    assert!(lock.is_file() && conf.is_dir() && results.is_dir() && state.is_dir(), "all made, as kubelet makes them");
    let volumes: Vec<&str> = flags.lines().filter(|f| f.starts_with("--volume=")).collect();
    assert_eq!(
        volumes,
        [
            format!("--volume={}:/run/xtables.lock", lock.display()),
            format!("--volume={}:/etc/cni/net.d:ro", conf.display()),
            format!("--volume={}:/var/lib/cni/results:ro", results.display()),
            format!("--volume={}:/run/iamlet", state.display()),
        ]
    );
    assert!(flags.lines().any(|f| f == "--read-only"), "the security context comes along: {flags}");

    let (ok, _, stderr) = {
        let output = Command::new(repo_root().join("scripts/image.sh"))
            .args(["run-flags", "--host-path=/nowhere=/tmp"])
            .output()
            .unwrap();
        (output.status.success(), (), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    assert!(!ok && stderr.contains("/nowhere"), "an override that names no mount is refused: {stderr}");
}

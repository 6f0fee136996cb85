//! moto's server, which speaks the real STS protocol, shared by the tests of one binary.
//!
//! Found at `IAMLET_MOTO_SERVER` or `.venv/bin/moto_server` (what `scripts/test.sh`
//! installs). Missing, it is a test failure that says how to install it: never a skip.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running moto server.
pub struct Moto {
    pub url: String,
}

/// The repository's Python virtualenv (created by scripts/test.sh).
pub fn venv_bin(name: &str) -> PathBuf {
    crate::repo_root().join(".venv/bin").join(name)
}

/// The shared moto server, started on first use.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(start)
}

fn start() -> Moto {
    let server = std::env::var_os("IAMLET_MOTO_SERVER").map(PathBuf::from).unwrap_or_else(|| venv_bin("moto_server"));
    assert!(
        server.exists(),
        "moto_server not found at {}: run scripts/test.sh (it installs moto into .venv) or set IAMLET_MOTO_SERVER",
        server.display()
    );
    let port = crate::free_port();
    // The shell waits on stdin, which closes when this test process exits however it exits,
    // and then stops moto: no server outlives its tests.
    let script = format!("{} -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; read _; kill $pid", server.display());
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting moto_server");
    // Keep the pipe's write end open for the life of the process.
    std::mem::forget(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Moto { url: format!("http://127.0.0.1:{port}") }
}
